"""Each private Lightning/torch access in lightning_autodp._compat, exercised on its own."""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn

from lightning_autodp import DPAutoStrategy, _compat
from tests.models import Classifier, loader, make_case, quiet_trainer


def test_sync_module_states(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = nn.Linear(3, 2)
        before = [p.detach().clone() for p in module.parameters()]
        _compat.sync_module_states(module)  # one rank: broadcast from rank 0 leaves it unchanged
        assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    finally:
        dist.destroy_process_group()


class LoopProbe(Callback):
    def __init__(self):
        self.processed = []
        self.restarting = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.processed.append(_compat.batches_processed_in_epoch(trainer))
        self.restarting.append(_compat.fit_loop_restarting(trainer))


def test_fit_loop_progress_accessors():
    net, x, y = make_case("linear", n=16)
    probe = LoopProbe()
    quiet_trainer(strategy=DPAutoStrategy(), callbacks=[probe], max_epochs=1).fit(
        Classifier(net), loader(x, y, batch_size=4)
    )
    assert probe.processed == [0, 1, 2, 3]  # micro-batches of the epoch processed before this one
    assert probe.restarting == [False] * 4


def test_grad_scaler_accessor():
    scaler = torch.amp.GradScaler("cpu")
    assert _compat.grad_scaler(MixedPrecision("16-mixed", "cpu", scaler=scaler)) is scaler
    assert _compat.grad_scaler(Precision()) is None


def test_norm_base_classes():
    assert isinstance(nn.BatchNorm1d(3), _compat.BATCH_NORM_BASE)
    assert isinstance(nn.SyncBatchNorm(3), _compat.BATCH_NORM_BASE)
    assert isinstance(nn.InstanceNorm2d(3), _compat.INSTANCE_NORM_BASE)
    assert not isinstance(nn.GroupNorm(1, 3), (_compat.BATCH_NORM_BASE, _compat.INSTANCE_NORM_BASE))


def test_compiled_module_and_donated_buffer_accessors():
    import torch._functorch.config as functorch_config
    from lightning.pytorch.utilities.compile import from_compiled

    module = Classifier(nn.Linear(2, 2))
    assert not _compat.is_compiled_lightning_module(module)
    assert _compat.is_compiled_lightning_module(from_compiled(torch.compile(module, backend="eager")))
    with functorch_config.patch(donated_buffer=False):
        assert _compat.donated_buffers_enabled() is False
    with functorch_config.patch(donated_buffer=True):
        assert _compat.donated_buffers_enabled() is True


def test_copy_without_hooks_runs_no_hook_and_leaves_the_original_hooked():
    layer = nn.Linear(2, 2)
    seen: list[str] = []
    layer.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    layer.register_forward_hook(lambda m, a, o: seen.append("post"))
    layer.register_forward_hook(lambda m, a, k, o: seen.append("kw"), with_kwargs=True)
    plain = _compat.copy_without_hooks(layer)
    x = torch.randn(3, 2)
    assert torch.equal(plain(x), layer(x))  # same parameters
    assert seen == ["pre", "post", "kw"]  # only the original's call ran hooks
    assert plain.weight is layer.weight


def test_clear_opacus_current_grad_sample():
    """Opacus keeps a parameter's per-sample gradient in ``_current_grad_sample`` during a backward."""
    from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample

    layer = nn.Linear(2, 1)
    create_or_accumulate_grad_sample(param=layer.weight, grad_sample=torch.ones(4, 1, 2), max_batch_len=4)
    assert layer.weight._current_grad_sample is not None  # what Opacus keeps mid-backward
    _compat.clear_opacus_current_grad_sample(layer.weight)
    assert layer.weight._current_grad_sample is None
    _compat.clear_opacus_current_grad_sample(nn.Parameter(torch.zeros(1)))  # never hooked: no error


def test_is_view():
    """F.linear with a bias on a 3-d input returns a view of its product (why the Linear rule copies)."""
    x = torch.randn(2, 3, 4)
    assert _compat.is_view(torch.nn.functional.linear(x, torch.randn(5, 4), torch.randn(5)))
    assert _compat.is_view(x[0]) and not _compat.is_view(x) and not _compat.is_view(x.clone())
