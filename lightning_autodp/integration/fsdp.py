r""":class:`DPFSDPStrategy`, registered as ``strategy="dp_fsdp"``: dp_auto with the model sharded (FSDP2).

Same DP semantics as :class:`~lightning_autodp.DPAutoStrategy`, from the same
:class:`~lightning_autodp.integration.dp_mechanism.DPMechanism` driven by the same hooks
(per-example clipping over all trainable parameters jointly, the clipped sums summed over ranks,
noise :math:`\sigma R z` in each coordinate exactly once, Poisson sampling, accumulation, the
privacy ledger), with every trainable parameter split over the ranks by
``torch.distributed.fsdp.fully_shard``. What this module adds is what sharding needs: the sharding
itself, the sharded DP step, the same verification examples on every rank, placeholder examples for
ranks with an empty Poisson sample, and sharded checkpoints. Why the semantics survive sharding:

* the one-backward engines (``bk``, ``ghost``) compute per-example norms from each layer's input
  and output gradient, which a rank has in full for its own examples: no per-example gradient is
  gathered or sharded, and autograd never forms the non-private weight gradient (so FSDP has
  nothing of its own to reduce);
* the clipped sums are reduce-scattered parameter by parameter, and each rank adds noise only to
  the shard it owns (:mod:`lightning_autodp.mechanism.sharded`); no rank holds the whole gradient (with
  ``bk``; ``ghost`` holds one micro-batch's clipped sums until its second backward ends).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.optim import Optimizer
from typing_extensions import override

from lightning_autodp import _compat
from lightning_autodp.engines.bookkeeping import BookKeepingEngine
from lightning_autodp.integration.strategy import CHECKPOINT_KEY, DPAutoStrategy
from lightning_autodp.mechanism import distributed
from lightning_autodp.mechanism.batches import size_or_reason, slice_batch
from lightning_autodp.mechanism.sampling import EmptyBatch
from lightning_autodp.mechanism.sharded import ShardedDPStep, check_shardable
from lightning_autodp.safeguards.verify import GradientLayout, ShardedLayout, logging_off

#: the engines whose per-example work needs no per-example gradient (so none is sharded)
SHARDED_ENGINES = ("auto", "bk", "ghost")
#: LightningModule methods that run the model: FSDP gathers the root's parameters around them
_FORWARD_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


class DPFSDPStrategy(DPAutoStrategy):
    r"""dp_auto for models sharded over the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Every argument of :class:`~lightning_autodp.DPAutoStrategy` applies, with the same meaning;
    the update handed to the optimizer is the same
    :math:`\tilde g = (\sum_i C_i g_i + \sigma R z) / B`, computed shard by shard (see
    :mod:`lightning_autodp.mechanism.sharded`). Differences:

    Args:
        engine: ``"bk"`` (one backward, the default for ``"auto"``) or ``"ghost"`` (two backward
            passes, activation memory of non-private training). ``"hooks"`` is refused: it forms
            per-example gradients of whole parameters. Layers without a one-backward rule
            (those dp_auto handles with its per-module torch.func rule) are refused, by name.
        reshard_after_forward: passed to ``fully_shard`` (free the gathered parameters after
            forward, gather them again in backward: less memory, more communication).
        sharded_checkpoint: write checkpoints as a directory of shards (every rank writes its own,
            with ``torch.distributed.checkpoint``; no rank gathers the model), the default; ``False``:
            one file with the full model and optimizer state gathered on rank 0's CPU.
        \**kwargs: the arguments of :class:`~lightning_autodp.DPAutoStrategy`.

    Sharding: if the LightningModule's ``configure_model`` already applied ``fully_shard`` to some
    of its submodules, that is kept; otherwise each element of every ``nn.ModuleList`` (the blocks
    of transformers models) becomes one FSDP unit. The LightningModule itself is always the root
    unit, so parameters outside the blocks are sharded too, and its ``training_step``,
    ``validation_step``, ``test_step`` and ``predict_step`` gather them. On one device nothing is
    sharded (the run is dp_auto's).

    Checkpoints hold the privacy ledger beside the model and optimizer state, sharded (default) or
    consolidated; either resumes on any number of ranks.

    Every rank takes part in every step's collectives: a rank whose Poisson sample is empty runs the
    first example of its dataset through ``training_step`` (nothing logged) and discards it exactly,
    so that FSDP's parameter gathers match on all ranks. The engine verification runs on the same
    examples on every rank. Not supported yet: :class:`~lightning_autodp.safeguards.audit.PrivacyAudit` (use
    dp_auto), meshes with replicated dimensions (HSDP), and ``ghost`` keeps one micro-batch's
    full-size clipped sums until its second backward ends (``bk`` holds at most one bucket).

    Example::

        import lightning as L
        import lightning_autodp

        trainer = L.Trainer(strategy="dp_fsdp", accelerator="gpu", devices=8,
                            callbacks=[lightning_autodp.PrivacyBudget(target_epsilon=3.0, delta=1e-5)])
    """

    strategy_name = "dp_fsdp"
    strategy_description = (
        "Differentially private training with the model sharded by FSDP2 (lightning-autodp)"
    )
    #: the mechanism's DP step: reduce-scatter of the clipped sums, noise on each rank's own shard
    dp_step_class = ShardedDPStep

    def __init__(
        self,
        *,
        engine: Literal["auto", "bk", "ghost"] = "auto",
        reshard_after_forward: bool = True,
        sharded_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        if engine not in SHARDED_ENGINES:
            raise ValueError(
                f"dp_fsdp supports engine='bk' or 'ghost' (and 'auto' = 'bk'), got engine={engine!r}: "
                "the 'hooks' engine forms per-example gradients of whole parameters, which sharding "
                "cannot hold. Use DPFSDPStrategy(engine='bk'), or strategy='dp_auto' for engine='hooks'."
            )
        # "auto" is "bk" here: the one-backward engine that holds at most one bucket of sums
        super().__init__(engine="bk" if engine == "auto" else engine, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.sharded_checkpoint = sharded_checkpoint
        self._sharded_checkpoint_path: Path | None = None
        self._placeholder: Any = None

    @property
    def is_sharded(self) -> bool:
        """True when the model is split over more than one process."""
        return self.runs_distributed

    # ------------------------------------------------------------------ sharding

    @override
    def prepare_module(self, module: pl.LightningModule) -> None:
        """Check the layers, then shard: the user's FSDP units, else one per block, and the root."""
        self._check_one_backward_layers(module)
        if not self.is_sharded:
            rank_zero_info("dp_fsdp on one process: nothing to shard, the model stays whole.")
            return
        user_units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        if not user_units:
            _compat.sync_module_states(module)  # the same initial weights on every rank, as DDP
        mesh = init_device_mesh(self.root_device.type, (self.world_size,))
        if not user_units:
            for block in _blocks(module):
                fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        if not isinstance(module, FSDPModule):
            fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        for method in _FORWARD_METHODS:
            if callable(getattr(module, method, None)):
                register_fsdp_forward_method(module, method)
        names = {id(p): n for n, p in module.named_parameters()}
        check_shardable([p for p in module.parameters() if p.requires_grad], names)

    def _check_one_backward_layers(self, module: nn.Module) -> None:
        fallbacks = BookKeepingEngine.fallback_modules(module)
        if fallbacks:
            shown = ", ".join(f"{n} ({type(m).__name__})" for n, m in fallbacks[:10])
            raise ValueError(
                f"dp_fsdp has no one-backward rule for {shown}: dp_auto handles such modules with a "
                "per-module torch.func rule, which needs their whole parameters. Freeze them "
                "(requires_grad=False), replace them by layers with a rule (nn.Linear, nn.Embedding, "
                "nn.LayerNorm, nn.RMSNorm, nn.Conv*d, nn.GroupNorm, transformers' Conv1D), or use "
                "strategy='dp_auto'."
            )

    # ------------------------------------------------------------------ verification

    @override
    def verify_first_batch(
        self, args: tuple, kwargs: dict, *, empty: bool = False, layout: GradientLayout | None = None
    ) -> bool:
        """Every rank verifies the same examples: those of the first rank with a non-empty micro-batch.

        Sharded parameters make each per-example backward a collective, and FSDP averages the
        gradients of all ranks: with the same example everywhere, that average is its gradient.
        """
        if not self.is_sharded:
            return super().verify_first_batch(args, kwargs, empty=empty, layout=layout)
        batch = args[0] if args else kwargs.get("batch")
        sizes: list[Any] = [None] * self.world_size
        dist.all_gather_object(sizes, (0, None) if empty else size_or_reason(batch))
        reason = next((why for _, why in sizes if why is not None), None)
        if reason is not None:  # every rank skips together (none may wait in a collective alone)
            rank_zero_warn(
                f"dp_fsdp could not verify engine={self.engine!r}: {reason}. "
                "Training continues without the check."
            )
            return True
        sizes = [n for n, _ in sizes]
        source = next((r for r, n in enumerate(sizes) if n), None)
        if source is None:
            return False  # every rank drew an empty micro-batch: verify on the next one
        shared: list[Any] = [None]
        if self.global_rank == source:
            k = min(self.verify_examples, int(sizes[source]))
            shared[0] = move_data_to_device(slice_batch(batch, 0, k), torch.device("cpu"))
        dist.broadcast_object_list(shared, src=source)
        sub_batch = move_data_to_device(shared[0], self.root_device)
        if args:
            args = (sub_batch, *args[1:])
        else:
            kwargs = {**kwargs, "batch": sub_batch}
        sharded = ShardedLayout(self.world_size, distributed.all_reduce_sum)
        return super().verify_first_batch(args, kwargs, empty=False, layout=sharded)

    # ------------------------------------------------------------------ the run

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """An empty Poisson micro-batch still runs forward and backward, on a placeholder example.

        Sharded parameters are gathered by collectives inside forward and backward, which every rank
        must enter. A rank that drew no example runs the first example of its dataset through
        ``training_step`` (nothing logged) and the step discards it: it adds exactly nothing to the
        clipped sum and is not counted as an example.
        """
        batch = args[0] if args else kwargs.get("batch")
        if not (self.is_sharded and isinstance(batch, EmptyBatch)):
            return super().training_step(*args, **kwargs)
        if self.verification_pending:  # a collective: join the ranks that verify their examples
            self.verification_pending = not self.verify_first_batch(args, kwargs, empty=True)
        placeholder = self._placeholder_batch()
        args = (placeholder, *args[1:]) if args else ()
        kwargs = kwargs if args else {**kwargs, "batch": placeholder}
        self.mechanism.discard_next_micro_batch()
        module = self.lightning_module
        with logging_off(module):
            return super().training_step(*args, **kwargs)

    def _placeholder_batch(self) -> Any:
        loader = self.mechanism.poisson_loader
        if self._placeholder is None:
            self._placeholder = loader.collate_fn([loader.dataset[0]])
        return self.batch_to_device(self._placeholder)

    @override
    def on_train_start(self) -> None:
        if any(not observer.supports_sharded for observer in self.observers):
            raise ValueError(
                "PrivacyAudit is not supported under dp_fsdp yet (its canaries are full-size gradients). "
                "Audit the same model and settings under strategy='dp_auto'."
            )
        super().on_train_start()

    # ------------------------------------------------------------------ checkpoints

    @override
    def model_to_device(self) -> None:
        """On GPUs a sharded run leaves the model where it was built: ``fully_shard`` moves each unit's
        shards to the device, so the whole model is never on one GPU."""
        if self.is_sharded and self.root_device.type != "cpu":
            return
        super().model_to_device()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Sharded checkpoints: this rank's shards (DTensors); else the full state on rank 0's CPU."""
        if not self._model_is_sharded():
            return super().lightning_module_state_dict()
        if self.sharded_checkpoint:
            return get_model_state_dict(self.model)
        return get_model_state_dict(self.model, options=_FULL_ON_RANK0)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer state keyed by parameter name, sharded or gathered on rank 0 as the model's."""
        if not self._model_is_sharded():
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        options = StateDictOptions() if self.sharded_checkpoint else _FULL_ON_RANK0
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """A sharded checkpoint is a directory: model and optimizer shards written by every rank with
        ``torch.distributed.checkpoint``, the rest (loops, callbacks, the privacy ledger) by rank 0."""
        if not (self._model_is_sharded() and self.sharded_checkpoint):
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError("dp_fsdp's sharded checkpoints take no storage_options.")
        checkpoint[CHECKPOINT_KEY] = self.dp_state_dict()
        path = Path(self.broadcast(str(filepath)))
        if self.is_global_zero and path.is_file():
            path.unlink()
        self.barrier("dp_fsdp_checkpoint_dir")
        path.mkdir(parents=True, exist_ok=True)
        shards = {"state_dict": checkpoint.pop("state_dict")}
        optimizer_states = checkpoint.pop("optimizer_states", [])
        shards.update({f"optimizer_{i}": state for i, state in enumerate(optimizer_states)})
        dcp.save(shards, checkpoint_id=path)
        checkpoint["sharded_optimizers"] = len(optimizer_states)
        if self.is_global_zero:
            torch.save(checkpoint, path / _META_FILE)
        self.barrier("dp_fsdp_checkpoint_saved")
        return None

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded checkpoint (directory) on any number of ranks; a file as dp_auto loads it.

        Called before the model is sharded: its state is read into the whole model (DCP reshards on
        load); the optimizer state is read once the optimizers exist (:meth:`load_optimizer_state_dict`).
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            self._sharded_checkpoint_path = None
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        checkpoint = torch.load(path / _META_FILE, weights_only=False, map_location="cpu")
        assert self.lightning_module is not None
        model_state = {"state_dict": self.lightning_module.state_dict()}
        dcp.load(model_state, checkpoint_id=path)
        checkpoint["state_dict"] = model_state["state_dict"]
        # Lightning requires the key; the states themselves are read from the shards
        checkpoint["optimizer_states"] = [None] * int(checkpoint.pop("sharded_optimizers", 0))
        self._sharded_checkpoint_path = path
        self.restore_dp_state(checkpoint)
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Shard the checkpoint's optimizer state: from the shards on disk, or the full state."""
        if not self._model_is_sharded():
            return super().load_optimizer_state_dict(checkpoint)
        path = self._sharded_checkpoint_path
        for i, optimizer in enumerate(self.optimizers):
            if path is not None:
                state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
                dcp.load(state, checkpoint_id=path)
                full = False
                osd = state[f"optimizer_{i}"]
            else:
                osd, full = checkpoint["optimizer_states"][i], True
            set_optimizer_state_dict(
                self.model, optimizer, osd, options=StateDictOptions(full_state_dict=full)
            )
        return None

    def _model_is_sharded(self) -> bool:
        return self.model is not None and any(isinstance(m, FSDPModule) for m in self.model.modules())


_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
#: the non-tensor part of a sharded checkpoint (loops, callbacks, the privacy ledger)
_META_FILE = "meta.pt"


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The elements of every ``nn.ModuleList`` that own trainable parameters (transformer blocks)."""
    blocks = []
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList):
            blocks.extend(b for b in sub if any(p.requires_grad for p in b.parameters()))
    return blocks


__all__ = ["DPFSDPStrategy"]
