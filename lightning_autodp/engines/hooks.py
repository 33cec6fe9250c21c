"""The exact fallback engine: Opacus's per-sample gradient hooks, attached in place.

Opacus's :class:`~opacus.grad_sample.GradSampleModule` registers forward and backward hooks on
every submodule with trainable parameters and materialises ``p.grad_sample`` (shape
``(b, *p.shape)``) during backward, with a registry of exact per-layer rules and a functorch
fallback for layers it has no rule for. Here the wrapper object only owns the hooks: the user's
module is still called directly by Lightning, so its ``state_dict`` keys keep no ``_module.``
prefix and a checkpoint loads into the plain model.

Cost: ``b`` times the parameter memory per micro-batch. :mod:`lightning_autodp.engines.bookkeeping` does
the same job from one backward pass without per-example gradients.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_autodp import _compat
from lightning_autodp.engines.base import PerSampleEngine, add_into
from lightning_autodp.engines.rules.batchnorm import BATCH_NORMS, normalised_with_running_statistics
from lightning_autodp.safeguards.batchnorm import check_per_example

_HOOK_FREE_COPIES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _hook_free(layer: nn.Module) -> nn.Module:
    """A shallow copy of ``layer`` without hooks, for functional re-computation under vmap."""
    if layer not in _HOOK_FREE_COPIES:
        _HOOK_FREE_COPIES[layer] = _compat.copy_without_hooks(layer)
    plain = _HOOK_FREE_COPIES[layer]
    plain.training = False
    return plain


#: the (args, kwargs) of each MultiheadAttention call in the step being captured, by layer
_MHA_CALLS: weakref.WeakKeyDictionary[nn.Module, list[tuple[tuple, dict]]] = weakref.WeakKeyDictionary()


def _mha_grad_sample(layer: nn.MultiheadAttention, activations: list[Tensor], backprops: Tensor) -> dict:
    """Per-example gradients of ``nn.MultiheadAttention`` by vmap over its functional forward.

    Opacus has no rule for this layer (its functorch fallback passes one input and drops the
    masks), and its ``DPMultiheadAttention`` renames parameters. The call's own query, key, value
    and keyword arguments (masks) are recorded by a pre-hook, so the re-computation is exact.
    """
    args, kwargs = _MHA_CALLS[layer].pop()
    query, key, value = (list(args) + [kwargs.pop(k) for k in ("query", "key", "value") if k in kwargs])[:3]
    key_padding_mask = kwargs.pop("key_padding_mask", None)
    kwargs["need_weights"] = False
    params = {name: p.detach() for name, p in layer.named_parameters() if p.requires_grad}

    def output_dot_backprop(params, q, k, v, mask, backprop):
        batched = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
        extra = {} if mask is None else {"key_padding_mask": mask.unsqueeze(0)}
        out = functional_call(plain, params, batched, {**kwargs, **extra})[0]
        return (out * backprop.unsqueeze(0)).sum()

    in_dims = (None, 0, 0, 0, None if key_padding_mask is None else 0, 0)
    # Eval mode: attention dropout cannot be replayed. The clipped sum is built from these very
    # gradients, so the sensitivity bound holds exactly; only attention dropout is left out.
    plain = _hook_free(layer)
    per_example = vmap(grad(output_dot_backprop), in_dims=in_dims)(
        params, query.detach(), key.detach(), value.detach(), key_padding_mask, backprops
    )
    named = dict(layer.named_parameters())
    return {named[name]: g for name, g in per_example.items()}


def _conv_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict:
    """Opacus's convolution rule on contiguous tensors.

    Opacus 1.6 unfolds the layer input with ``as_strided`` and strides that assume a contiguous
    (NCHW) layout; a channels-last input (``x.contiguous(memory_format=torch.channels_last)``,
    or a permuted LayerNorm-over-channels output) silently gives wrong per-example gradients.
    """
    return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops.contiguous())


def _batch_norm_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict:
    r"""Per-example gradients of an eval-mode BatchNorm's affine parameters (see :mod:`.rules.batchnorm`).

    :math:`\hat x` from the running statistics; ``dw_i = sum_spatial(g_i * xhat_i)``,
    ``db_i = sum_spatial(g_i)``.
    The forward hook refuses a call in train mode, so the statistics here are the ones the forward used.
    """
    x = activations[0]
    xhat = normalised_with_running_statistics(layer, x)
    spatial = list(range(2, x.dim()))

    def per_example(t: Tensor) -> Tensor:
        return t.sum(spatial) if spatial else t

    out = {}
    if layer.weight is not None and layer.weight.requires_grad:
        out[layer.weight] = per_example(backprops * xhat)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = per_example(backprops)
    return out


class HooksEngineError(RuntimeError):
    """Opacus's per-sample gradient hooks failed on a layer; the message names it and the fix."""


#: the fix every hooks-engine error names: the default engine has no Opacus hooks at all
_USE_AUTO = (
    "Use engine='auto' (the default): it computes exact per-example gradients of every layer from one "
    "backward pass, without Opacus's hooks, and falls back to an exact torch.func rule for layers it has "
    "no rule for."
)


def _hooks_error(layer: str | None, err: BaseException, why: str = "", cause: str = "") -> HooksEngineError:
    """The error a user sees for ``err`` raised by Opacus's hooks on ``layer`` (``'name' (Type)``).

    ``cause`` replaces the default "Opacus's hooks raised <err>"; ``why`` explains it.
    """
    where = f" on layer {layer}" if layer else ""
    cause = cause or f"Opacus's per-sample gradient hooks raised {type(err).__name__}: {err}."
    detail = f" {why}" if why else ""
    return HooksEngineError(f"engine='hooks' failed{where}: {cause}{detail} {_USE_AUTO}")


def _non_tensor_inputs(forward_input: tuple) -> list[str]:
    return [type(a).__name__ for a in forward_input if not isinstance(a, Tensor)]


class _InPlaceGradSampleModule(GradSampleModule):
    """Opacus's hooks, with rules of our own for ``nn.MultiheadAttention`` (batch_first) and
    for convolutions on channels-last inputs, and errors that name the layer.

    A subclass, so that Opacus's global registry stays untouched for the user's other code. Every
    exception raised while Opacus attaches its hooks, in its forward hook or in its backward hook
    (where it runs the per-layer rules) becomes a :class:`HooksEngineError` naming the layer (its
    path in the user's module and its type), chained to Opacus's own exception.
    """

    GRAD_SAMPLERS = {
        **GradSampleModule.GRAD_SAMPLERS,
        nn.MultiheadAttention: _mha_grad_sample,
        nn.Conv1d: _conv_grad_sample,
        nn.Conv2d: _conv_grad_sample,
        nn.Conv3d: _conv_grad_sample,
        **dict.fromkeys(BATCH_NORMS, _batch_norm_grad_sample),
    }

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        # Plain attributes (no modules) may be set before nn.Module.__init__.
        self._dp_names = {id(m): name or type(module).__name__ for name, m in module.named_modules()}
        self._dp_layer: str | None = None  # the layer Opacus is attaching hooks to
        self.last_layer: str | None = None  # the last hooked layer whose forward ran
        try:
            super().__init__(module, **kwargs)
        except Exception as err:
            if "_module" in self._modules:  # hooks attached before the failure must not stay on the model
                self.remove_hooks()
            why = ""
            if "has buffers" in str(err):
                why = (
                    "Opacus has no per-sample rule for this layer's type, and its generic functorch rule "
                    "refuses layers that hold buffers."
                )
            raise _hooks_error(self._dp_layer, err, why) from err

    def label(self, module: nn.Module) -> str:
        """``'path.in.model' (Type)`` of a hooked layer."""
        return f"{self._dp_names.get(id(module), '?')!r} ({type(module).__name__})"

    def iterate_submodules(self, module: nn.Module) -> Iterator[nn.Module]:
        for m in super().iterate_submodules(module):
            self._dp_layer = self.label(m)
            yield m

    def capture_activations_hook(self, module: nn.Module, forward_input: Any, _forward_output: Any) -> None:
        # Recorded even with the hooks off: Opacus's backward hooks stay registered, and an in-place
        # operation on a hooked layer's output fails outside the captured steps as well.
        self.last_layer = self.label(module)
        eval_batch_norm = isinstance(module, BATCH_NORMS) and not module.training
        if isinstance(module, BATCH_NORMS) and self.hooks_enabled and torch.is_grad_enabled():
            check_per_example(self._dp_names.get(id(module), "?"), module)
        try:
            # Opacus records activations of train-mode layers only; an eval-mode BatchNorm with
            # trainable parameters is exactly what its sampler handles, so it is recorded as in train mode.
            module.training = module.training or eval_batch_norm
            super().capture_activations_hook(module, forward_input, _forward_output)
        except Exception as err:
            why = ""
            if _non_tensor_inputs(forward_input):
                why = (
                    "Opacus stores every positional input of a hooked layer as a tensor, and this layer was "
                    f"called with a positional {', '.join(_non_tensor_inputs(forward_input))}."
                )
            raise _hooks_error(self.label(module), err, why) from err
        finally:
            if eval_batch_norm:
                module.training = False

    def capture_backprops_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        try:
            super().capture_backprops_hook(module, *args, **kwargs)
        except Exception as err:
            why = ""
            if "No activations detected" in str(err) and not module.training:
                why = (
                    "Opacus records a layer's inputs only in train mode, and this layer has trainable "
                    "parameters but ran in eval mode."
                )
            raise _hooks_error(self.label(module), err, why) from err


def _raised_in_opacus(err: BaseException) -> bool:
    """True when a frame of ``err``'s traceback is in the ``opacus`` package."""
    tb = err.__traceback__
    while tb is not None:
        if os.sep + "opacus" + os.sep in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class HooksEngine(PerSampleEngine):
    """Per-example gradients from Opacus's hooks (exact, broad layer coverage).

    Example::

        engine = HooksEngine(model)
        with engine.capturing():
            model(x).sum().backward()
        sq_norms = engine.per_sample_squared_norms()
    """

    name = "hooks"

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._names = {id(p): name for name, p in module.named_parameters()}
        # loss_reduction="sum": the engine reports raw per-example gradients of what was
        # backpropagated; the strategy owns the rescaling for mean losses and accumulation.
        # strict=False: buffers (positional encodings, running stats) are validated by the
        # strategy with errors of its own; BatchNorm only in eval mode (checked at every step).
        self._gsm = _InPlaceGradSampleModule(module, batch_first=True, loss_reduction="sum", strict=False)
        self._gsm.disable_hooks()
        self._handles = [
            m.register_forward_pre_hook(self._record_mha_call, with_kwargs=True)
            for m in module.modules()
            if isinstance(m, nn.MultiheadAttention)
        ]

    def _record_mha_call(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._capturing and layer.training and torch.is_grad_enabled():
            _MHA_CALLS.setdefault(layer, []).append((tuple(args), dict(kwargs)))

    def explain_error(self, err: BaseException) -> Exception | None:
        """A :class:`HooksEngineError` for an exception that Opacus's hooks caused outside them.

        Opacus's full backward hooks wrap each hooked layer's output in a view made by a custom
        autograd Function; torch forbids modifying that view in place, so an in-place operation on
        the output (``nn.ReLU(inplace=True)``, ``x += ...``) raises in the user's forward, outside any
        hook. The layer named is the last hooked layer that ran before it. Any other exception whose
        traceback passes through Opacus gets the generic message.
        """
        if isinstance(err, HooksEngineError):
            return None
        text = str(err)
        if "BackwardHookFunction" in text and "inplace" in text:
            cause = (
                "an in-place operation (e.g. nn.ReLU(inplace=True) or `x += ...`) modified the output of a "
                "layer hooked by Opacus, which its backward hooks make a view that autograd forbids "
                "modifying in place (torch: 'Output 0 of BackwardHookFunction is a view and is being "
                "modified inplace')."
            )
            why = (
                "The layer named is the last hooked layer that ran before the failing operation. Making the "
                "operation out of place (inplace=False) also avoids it."
            )
            return _hooks_error(self._gsm.last_layer, err, why, cause)
        if _raised_in_opacus(err):
            return _hooks_error(self._gsm.last_layer, err)
        return None

    @classmethod
    def unsupported_modules(cls, module: nn.Module) -> list[tuple[str, nn.Module]]:
        # Layers without an Opacus rule fall back to functorch, which handles any layer that
        # is a pure function of one batch-first input and its parameters.
        return [
            (name, m)
            for name, m in module.named_modules()
            if isinstance(m, nn.MultiheadAttention)
            and not m.batch_first
            and any(p.requires_grad for p in m.parameters())
        ]

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self._gsm.enable_hooks()
        try:
            with super().capturing():
                yield
        except Exception as err:
            explained = self.explain_error(err)
            if explained is None:
                raise
            raise explained from err
        finally:
            self._gsm.disable_hooks()

    def _grad_samples(self) -> list[tuple[nn.Parameter, Tensor]]:
        """Each parameter's per-example gradients, all with the micro-batch size as dim 0."""
        out = []
        for p in self.params:
            grad_sample = getattr(p, "grad_sample", None)
            if grad_sample is None:
                continue
            if isinstance(grad_sample, list):  # several backward passes without reset
                grad_sample = torch.cat(grad_sample, dim=0)
            out.append((p, grad_sample))
        self._check_batch_dims(out)
        return out

    def _check_batch_dims(self, grad_samples: list[tuple[nn.Parameter, Tensor]]) -> None:
        """Refuse per-example gradients whose batch dimension is not the micro-batch size.

        A layer called with an input shared by the whole batch (transformers' GPT-2 and BERT
        call their position embedding with ``position_ids`` of shape ``(1, T)``, broadcast to the
        batch later) receives the output gradient already summed over the batch: Opacus returns
        batch dimension 1, and using it for every example would break the per-example bound. The
        micro-batch size is the largest batch dimension seen.
        """
        if not grad_samples:
            return
        size = max(gs.shape[0] for _, gs in grad_samples)
        wrong = [(self._names.get(id(p), "?"), gs.shape[0]) for p, gs in grad_samples if gs.shape[0] != size]
        if wrong:
            listed = ", ".join(f"{name} (batch dimension {b})" for name, b in wrong)
            raise RuntimeError(
                f"engine='hooks': Opacus returned per-example gradients for a micro-batch of {size} examples "
                f"but not for {listed}: its layer was called with an input shared by the whole batch "
                "(e.g. position_ids of shape (1, T) in transformers' GPT-2/BERT), so its gradient is already "
                "summed over the examples and cannot be clipped per example. Use engine='auto' or "
                "engine='bk', or pass that input expanded to the batch (position_ids.expand(batch_size, -1))."
            )

    @property
    def batch_size(self) -> int:
        grad_samples = self._grad_samples()
        return grad_samples[0][1].shape[0] if grad_samples else 0

    def per_sample_squared_norms(self) -> Tensor:
        sq_norms: Tensor | None = None
        for _, grad_sample in self._grad_samples():
            layer_sq = (
                grad_sample.reshape(grad_sample.shape[0], -1)
                .to(torch.promote_types(grad_sample.dtype, torch.float32))
                .pow(2)
                .sum(dim=1)
            )
            sq_norms = layer_sq if sq_norms is None else sq_norms + layer_sq
        if sq_norms is None:
            return torch.zeros(0)
        return sq_norms

    def accumulate_weighted_sum(self, weights: Tensor, summed: dict[nn.Parameter, Tensor]) -> None:
        for p, grad_sample in self._grad_samples():
            w = weights.to(device=grad_sample.device, dtype=grad_sample.dtype)
            add_into(summed, p, torch.einsum("i,i...->...", w, grad_sample))

    def reset(self) -> None:
        for p in self.params:
            p.grad_sample = None
            _compat.clear_opacus_current_grad_sample(p)
        for module in self.module.modules():
            if hasattr(module, "activations"):
                module.activations = []
            _MHA_CALLS.pop(module, None)

    def remove(self) -> None:
        self.reset()
        self._gsm.remove_hooks()
        for handle in self._handles:
            handle.remove()
        for module in self.module.modules():
            for attr in ("activations", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)
