r"""Check a per-sample engine against plain autograd before it is trusted with a training run.

Before the first optimizer update of every fit, :class:`~lightning_autodp.DPAutoStrategy` hands
the first micro-batch to :func:`verify_engine`. It takes the first ``k`` examples (default 4) and
computes, for each of them, the gradient of that example alone: ``training_step`` on a batch of
one example and its own backward pass, with plain autograd and no engine involved:

.. math:: g_i = \nabla_\theta\, \ell(\theta; x_i), \qquad n_i = \|g_i\|.

It then runs ``training_step`` once on the ``k`` examples together under the engine, as the
strategy does, and compares in true per-example units (the engine's raw gradients are
:math:`s\, g_i` with :math:`s = 1/k` for ``loss_reduction="mean"`` and :math:`1` for ``"sum"``):

* the per-example norms: :math:`|\hat n_i - n_i| \le \text{rtol}\cdot n_i`;
* for every trainable parameter :math:`p`, the weighted sum with weights
  :math:`w_i = (1 + i) / (k\, n_i)` (each example scaled to norm :math:`(1+i)/k`, distinct
  weights so that examples cannot be swapped unnoticed):
  :math:`\|\hat S_p - S_p\| \le \text{rtol}\,(\sum_i w_i \|g_i[p]\| + \text{floor})`, where
  ``floor`` is :math:`10^{-2}` of the whole sum's scale :math:`\sum_i w_i n_i`, so that float
  round-off in parameters with almost no gradient is not mistaken for a defect.

A mismatch raises :class:`EngineVerificationError` naming the parameters that disagree, before any
update. A defect (a per-example gradient broadcast over the batch, a batch-free table mistaken for
a batch, a wrong third-party rule) gives relative errors of order 1; round-off in float32 gives
about ``1e-6``: the tolerance is ``1e-3`` in float32 and ``1e-7`` in float64.

What the verification pass changes nothing of:

* Dropout: masks differ between calls, so both passes run with every module that owns no
  trainable parameter of its own in eval mode (``nn.Dropout`` and the attention blocks of
  transformers models that read ``self.training``), and ``nn.MultiheadAttention``'s attention
  dropout set to 0. Modules that own trainable parameters stay in train mode, because engines
  (Opacus's hooks) capture only modules in train mode. If ``training_step`` is still not
  deterministic (a module with parameters that draws random numbers), the verification says so
  and is skipped.
* Randomness: everything runs under :func:`torch.random.fork_rng` (and Python's and NumPy's
  generator states are restored), so a seeded run is bit-identical with and without it.
* State: parameters' ``.grad``, buffers, training modes and the engine's capture state are
  restored; calls to ``self.log``/``self.log_dict`` inside ``training_step`` are dropped, so
  nothing reaches the loggers. Other side effects of ``training_step`` (counters, direct logger
  calls) happen ``k + 2`` extra times.
* Precision: autocast is off; the comparison is in the parameters' dtype.

Cost: ``k + 2`` forward/backward passes on single examples or ``k`` examples, once per fit, and
memory for ``k`` gradients of the trainable parameters (small for adapters such as LoRA).

Batches of any nesting of tuples, lists, dicts and other mappings (transformers'
``BatchEncoding``) are sliced along dim 0 of every tensor leaf whose dim 0 is the batch size,
taken from the first tensor leaf (Lightning's convention). A batch with no tensor, or with a list
of per-example Python values (strings) that cannot be told apart from other lists, is not
sliced: a warning says the verification was skipped and why.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_autodp.engines.base import PerSampleEngine
from lightning_autodp.mechanism.batches import (
    Unsliceable,
    batch_size_of,
    infer_batch_size,
    slice_batch,
)
from lightning_autodp.mechanism.sharded import local_part, reduce_scatter_to_shard, sum_dtype

#: examples of the first micro-batch checked by default
DEFAULT_EXAMPLES = 4
#: relative tolerance by parameter dtype (defects give relative errors of order 1)
_RTOL = {torch.float64: 1e-7, torch.float32: 1e-3}
#: share of the whole weighted sum's scale below which a parameter's error is round-off
_FLOOR = 1e-2


class EngineVerificationError(RuntimeError):
    """The engine's per-example norms or clipped sum disagree with a per-example loop."""


@dataclass
class VerificationResult:
    """What :func:`verify_engine` found: the largest relative errors of the norms and of the
    per-parameter weighted sums (NaN, with the reason in ``skipped``, when it was skipped)."""

    examples: int
    max_norm_error: float
    max_sum_error: float
    skipped: str | None = None


def check_verify_args(verify: bool, verify_examples: int) -> None:
    """Reject bad ``DPAutoStrategy(verify=..., verify_examples=...)`` before training starts."""
    if not isinstance(verify, bool):
        raise ValueError(f"verify must be True or False, got {verify!r}.")
    if isinstance(verify_examples, bool) or not isinstance(verify_examples, int) or verify_examples < 1:
        raise ValueError(
            f"verify_examples must be an integer >= 1 (examples of the first micro-batch checked), "
            f"got {verify_examples!r}. Use verify=False to turn the verification off."
        )


# ---------------------------------------------------------------------------------- isolation


@contextlib.contextmanager
def _isolated(module: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Run the verification without leaving a trace: RNG, grads, buffers, modes, logging."""
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    modes = [(m, m.training) for m in module.modules()]
    mha_dropout = [(m, m.dropout) for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
    py_state = random.getstate()
    np_state = _numpy_state()
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    try:
        with torch.random.fork_rng(devices=devices), _no_autocast(), torch.enable_grad(), logging_off(module):
            _dropout_free(module)
            yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
        for m, p in mha_dropout:
            m.dropout = p
        random.setstate(py_state)
        _set_numpy_state(np_state)


def _dont_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` inside :func:`logging_off`: nothing reaches the loggers."""


@contextlib.contextmanager
def logging_off(module: nn.Module) -> Iterator[None]:
    """Inside, the module's ``self.log`` / ``self.log_dict`` do nothing (restored on exit)."""
    own = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.log = _dont_log  # type: ignore[method-assign]
    module.log_dict = _dont_log  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in own:
                module.__dict__[name] = own[name]
            else:
                module.__dict__.pop(name, None)


def _dropout_free(module: nn.Module) -> None:
    """Eval mode for modules without trainable parameters of their own; no attention dropout.

    Engines capture modules with trainable parameters only in train mode, so those keep it.
    """
    for m in module.modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.training = False
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return None
    return np.random.get_state()


def _set_numpy_state(state: Any) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)


# ---------------------------------------------------------------------------------- the check


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    return None


class GradientLayout:
    """How the verification reads gradients: whole tensors on every rank (the default).

    :class:`ShardedLayout` reads this rank's shards of sharded parameters
    instead; the comparison is then made shard by shard, and norms are summed over ranks.
    """

    def reference_grads(self, loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
        """The gradient of ``loss`` for each of ``params`` (zeros where it has none)."""
        g = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi.detach() for gi, p in zip(g, params)]

    def squared_norm(self, grads: list[Tensor]) -> Tensor:
        """``||g||^2`` over all parameters, in float64."""
        return sum((gi.double() ** 2).sum() for gi in grads)  # type: ignore[return-value]

    def engine_sums(
        self, engine: PerSampleEngine, weights: Tensor, params: list[nn.Parameter]
    ) -> dict[nn.Parameter, Tensor]:
        """The engine's ``sum_i weights[i] * g_i[p]`` in the layout of :meth:`reference_grads`."""
        summed: dict[nn.Parameter, Tensor] = {}
        engine.accumulate_weighted_sum(weights, summed)
        return summed


class ShardedLayout(GradientLayout):
    """The verification's view of sharded parameters: this rank's shards, norms summed over ranks.

    Every rank must verify the *same* examples (the strategy broadcasts them): FSDP then averages
    identical per-example gradients in its reduce-scatter, so each rank's shard of ``p.grad`` is
    its shard of that example's gradient, and the engine's sums, reduce-scattered like the
    training step's, are ``world_size`` times the per-rank sum.
    """

    def __init__(self, world_size: int, all_reduce: Callable[[Tensor], None] | None) -> None:
        self.world_size = world_size
        self.all_reduce = all_reduce

    def reference_grads(self, loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
        for p in params:
            p.grad = None
        loss.backward()
        out = [
            local_part(p.grad).detach().clone() if p.grad is not None else torch.zeros_like(local_part(p))
            for p in params
        ]
        for p in params:
            p.grad = None
        return out

    def squared_norm(self, grads: list[Tensor]) -> Tensor:
        device = grads[0].device if grads else None
        total = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            total += (g.double() ** 2).sum()
        if self.all_reduce is not None:
            self.all_reduce(total)
        return total

    def engine_sums(
        self, engine: PerSampleEngine, weights: Tensor, params: list[nn.Parameter]
    ) -> dict[nn.Parameter, Tensor]:
        out: dict[nn.Parameter, Tensor] = {}
        for p, full in engine.weighted_sums_in_order(weights, params):
            if full is None:
                full = torch.zeros(p.shape, dtype=sum_dtype(p), device=local_part(p).device)
            out[p] = reduce_scatter_to_shard(full.to(sum_dtype(p)), p) / self.world_size
        return out


def _reference(
    step: Callable[[Any], Any], batch: Any, k: int, params: list[nn.Parameter], layout: GradientLayout
) -> tuple[Tensor, list[list[Tensor]]] | None:
    """Per-example norms ``n_i`` and gradients ``g_i``: each example alone, its own backward.

    ``None`` if ``training_step`` returns no loss tensor.
    """
    grads, norms = [], []
    for i in range(k):
        loss = _loss_of(step(slice_batch(batch, i, i + 1)))
        if loss is None:
            return None
        g = layout.reference_grads(loss, params)
        grads.append(g)
        norms.append(torch.sqrt(layout.squared_norm(g)))
    return torch.stack(norms), grads


def _engine_pass(
    engine: PerSampleEngine,
    step: Callable[[Any], Any],
    sub_batch: Any,
    weights: Tensor,
    scale: float,
    layout: GradientLayout,
) -> tuple[int, Tensor, dict[nn.Parameter, Tensor]]:
    """The engine's batch size, norms ``||g_i||`` and ``sum_i w_i g_i`` in true units (raw = s * g_i)."""
    for p in engine.params:
        p.grad = None
    engine.reset()
    # As the strategy does before every capture: engines expand ids shared by the batch to this size.
    engine.expect_batch_size(infer_batch_size(sub_batch))
    summed: dict[nn.Parameter, Tensor] = {}
    try:
        with engine.capturing():
            loss = _loss_of(step(sub_batch))
            assert loss is not None
            loss.backward(retain_graph=engine.needs_backward_root)
            if engine.needs_backward_root:
                engine.set_backward_root(loss)
        size = engine.batch_size
        with torch.no_grad():  # as the strategy's DP step: no graph through the recorded activations
            raw_sq = engine.per_sample_squared_norms()
        norms = raw_sq.double().sqrt() / scale
        if size == weights.numel():  # as the strategy passes them: on the norms' device and dtype
            with torch.no_grad():
                summed = layout.engine_sums(
                    engine, (weights / scale).to(raw_sq.device, raw_sq.dtype), engine.params
                )
    finally:
        engine.reset()
    return size, norms, summed


def verify_engine(
    module: nn.Module,
    engine: PerSampleEngine,
    step_args: tuple,
    step_kwargs: dict[str, Any] | None = None,
    *,
    loss_reduction: str = "mean",
    examples: int = DEFAULT_EXAMPLES,
    layout: GradientLayout | None = None,
) -> VerificationResult:
    """Compare ``engine`` with a per-example loop on the first ``examples`` of a micro-batch.

    Args:
        module: the LightningModule (or any module with ``training_step(batch, *rest)``).
        engine: the engine attached to ``module``.
        step_args, step_kwargs: the arguments of ``training_step`` for the micro-batch; the batch
            is ``step_args[0]`` (or ``step_kwargs["batch"]``).
        loss_reduction: ``"mean"`` or ``"sum"``, as in :class:`~lightning_autodp.DPAutoStrategy`.
        examples: how many examples to check (fewer if the micro-batch is smaller).
        layout: how gradients are read (:class:`GradientLayout`, the default: whole tensors).

    Raises:
        EngineVerificationError: the engine disagrees with the loop; nothing was updated.

    Returns the largest relative errors found, or a result with ``skipped`` set (and a warning
    issued) when the batch cannot be sliced or the step is not deterministic.
    """
    step_kwargs = dict(step_kwargs or {})
    args = list(step_args)
    in_args = bool(args)
    batch = args[0] if in_args else step_kwargs.get("batch")
    try:
        k = min(examples, batch_size_of(batch))
    except Unsliceable as why:
        return _skip(f"dp_auto could not verify engine={engine.name!r}: {why}.")

    def step(b: Any) -> Any:
        if in_args:
            return module.training_step(b, *args[1:], **step_kwargs)  # type: ignore[operator]
        return module.training_step(**{**step_kwargs, "batch": b})  # type: ignore[operator]

    params = engine.params
    layout = layout or GradientLayout()
    with _isolated(module, params):
        reference = _reference(step, batch, k, params, layout)
        again = _reference(step, batch, 1, params, layout)
        if reference is None or again is None:
            return _skip(
                f"dp_auto could not verify engine={engine.name!r}: training_step returned no loss tensor."
            )
        ref_norms, ref_grads = reference
        if not torch.allclose(again[0], ref_norms[:1], rtol=1e-9, atol=0.0):
            return _skip(
                f"dp_auto could not verify engine={engine.name!r}: training_step gives different gradients "
                "for the same example even with dropout modules in eval mode (a module with parameters "
                "draws random numbers)."
            )
        weights = torch.arange(1, k + 1, dtype=torch.float64) / (k * ref_norms.clamp_min(1e-30))
        scale = 1.0 / k if loss_reduction == "mean" else 1.0
        size, norms, summed = _engine_pass(engine, step, slice_batch(batch, 0, k), weights, scale, layout)
    return _compare(engine, module, params, k, size, norms, summed, ref_norms, ref_grads, weights)


def _skip(message: str) -> VerificationResult:
    warnings.warn(message + " Training continues without the check.", stacklevel=3)
    return VerificationResult(
        examples=0, max_norm_error=float("nan"), max_sum_error=float("nan"), skipped=message
    )


def _compare(
    engine: PerSampleEngine,
    module: nn.Module,
    params: list[nn.Parameter],
    k: int,
    size: int,
    norms: Tensor,
    summed: dict[nn.Parameter, Tensor],
    ref_norms: Tensor,
    ref_grads: list[list[Tensor]],
    weights: Tensor,
) -> VerificationResult:
    names = {id(p): name for name, p in module.named_parameters()}
    rtol = max((_RTOL.get(p.dtype, 1e-3) for p in params), default=1e-3)
    if size != k or norms.shape != ref_norms.shape:
        raise EngineVerificationError(
            _message(
                engine,
                f"it saw {size} examples in a micro-batch of {k} (per-example norms {tuple(norms.shape)})",
                [],
            )
        )
    norm_err = ((norms.cpu() - ref_norms).abs() / ref_norms.clamp_min(1e-30)).max().item()
    whole = float((weights * ref_norms).sum())
    bad: list[tuple[str, float]] = []
    max_sum_err = 0.0
    for j, p in enumerate(params):
        ref = sum(w * g[j].double() for w, g in zip(weights.tolist(), ref_grads))
        got = summed.get(p)
        got = torch.zeros_like(ref) if got is None else got.detach().double().cpu().view_as(ref)
        size_p = sum(w * g[j].double().norm() for w, g in zip(weights.tolist(), ref_grads)).item()
        err = (got - ref.cpu()).norm().item()
        rel = err / max(size_p, _FLOOR * whole, 1e-30)
        max_sum_err = max(max_sum_err, rel)
        if rel > rtol:
            bad.append((names.get(id(p), "?"), rel))
    if bad or norm_err > rtol:
        detail = f"per-example norms off by up to {norm_err:.2g} (relative)"
        raise EngineVerificationError(_message(engine, detail, bad))
    return VerificationResult(examples=k, max_norm_error=norm_err, max_sum_error=max_sum_err)


def _message(engine: PerSampleEngine, detail: str, bad: list[tuple[str, float]]) -> str:
    shown = ", ".join(
        f"{name} (relative error {rel:.2g})" for name, rel in sorted(bad, key=lambda b: -b[1])[:10]
    )
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    params = f" Parameters whose clipped sum disagrees: {shown}{more}." if bad else ""
    return (
        f"dp_auto refuses to train: engine={engine.name!r} disagrees with a per-example loop (each example "
        f"alone through training_step, its own backward) on the first micro-batch: {detail}.{params} "
        "Its clipped updates would not have the per-example bound the privacy guarantee needs. Try "
        "another engine (DPAutoStrategy(engine='bk' / 'ghost' / 'hooks')) and report the model to "
        "lightning-autodp as a bug. If training_step's loss is not the mean (loss_reduction='mean') or "
        "sum ('sum') of per-example terms (e.g. a token mean over padded sequences), or uses other "
        "examples of the batch (contrastive losses), fix that; DPAutoStrategy(verify=False) turns "
        "this check off."
    )
