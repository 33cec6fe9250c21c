"""On one CUDA device (skipped without one; benchmarks/gpu.sh runs them): placement, the exact update,
bf16, secure noise on the device, the physical batch cap, and a one-GPU dp_fsdp run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, make_case, quiet_trainer
from reference import per_example_gradients, reference_clipped_mean

from lightning_autodp import DPAutoStrategy, DPFSDPStrategy
from lightning_autodp.mechanism.noise import NoiseSource

pytestmark = pytest.mark.cuda
R = 1.7  # between the examples' gradient norms: Abadi clips some of them, not all


class DeviceRecorder(Classifier):
    """Records where the batch, the parameters and their gradients were during training."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.devices: set[str] = set()

    def training_step(self, batch, batch_idx):
        self.devices |= {batch[0].device.type, *(p.device.type for p in self.parameters())}
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        self.devices |= {p.grad.device.type for p in self.parameters() if p.grad is not None}


def _fit(case, *, strategy, precision="64-true", n=8, batch_size=8, steps=1):
    net, x, y = make_case(case, n=n)
    model = DeviceRecorder(copy.deepcopy(net), optimizer="sgd", lr=1.0)
    before = [p.detach().clone() for p in model.net.parameters()]
    quiet_trainer(strategy=strategy, precision=precision, max_steps=steps, accelerator="gpu").fit(
        model, loader(x, y, batch_size=batch_size)
    )
    update = [(b.to("cuda") - a.detach()).cpu() for b, a in zip(before, model.net.parameters())]
    return net, x, y, model, update


def _expected(net, x, y, n=8):
    netd = copy.deepcopy(net).double()
    xd = x.double() if x.is_floating_point() else x

    def loss_i(m, i):
        return F.cross_entropy(m(xd[i : i + 1]), y[i : i + 1])

    return reference_clipped_mean(per_example_gradients(netd, loss_i, n), "abadi", R, 0.01, n)


@pytest.mark.parametrize("engine", ["bk", "ghost", "hooks"])
@pytest.mark.parametrize("cap", [None, 3])
def test_update_on_the_gpu_is_the_per_example_loop_update(engine, cap):
    strategy = DPAutoStrategy(
        noise_multiplier=0.0, clipping="abadi", max_grad_norm=R, poisson_sampling=False, engine=engine,
        max_physical_batch_size=cap,
    )  # fmt: skip
    net, x, y, model, update = _fit("transformer", strategy=strategy)
    assert model.devices == {"cuda"}
    for u, e in zip(update, _expected(net, x, y)):
        assert ((u - e).norm() / e.norm()).item() < 1e-6


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_is_drawn_on_the_gpu_with_the_right_scale(secure_mode):
    sigma, batch_size = 2.0, 16
    strategy = DPAutoStrategy(noise_multiplier=sigma, max_grad_norm=1.0, secure_mode=secure_mode)

    class ZeroGradient(DeviceRecorder):
        def training_step(self, batch, batch_idx):
            return 0.0 * super().training_step(batch, batch_idx)

    net = torch.nn.Linear(100, 100)
    model = ZeroGradient(net, optimizer="sgd", lr=1.0)
    x, y = torch.randn(64, 100), torch.zeros(64, dtype=torch.long)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    quiet_trainer(strategy=strategy, max_steps=1, accelerator="gpu").fit(
        model, loader(x, y, batch_size=batch_size)
    )
    after = torch.cat([p.detach().flatten().cpu() for p in net.parameters()])
    assert model.devices == {"cuda"}
    assert abs((after - before).std().item() / (sigma / batch_size) - 1) < 0.05
    source = NoiseSource(seed=0, secure_mode=secure_mode)
    source.start_step(0)
    assert source.gaussian(1.0, like=torch.empty(4, device="cuda")).device.type == "cuda"


def test_bf16_mixed_trains_to_bf16_accuracy():
    strategy = DPAutoStrategy(noise_multiplier=0.0, clipping="abadi", max_grad_norm=R, poisson_sampling=False)
    net, x, y, model, update = _fit("transformer", strategy=strategy, precision="bf16-mixed")
    assert model.devices == {"cuda"}
    u = torch.cat([t.double().flatten() for t in update])
    e = torch.cat([t.flatten() for t in _expected(net, x, y)])
    assert torch.isfinite(u).all()
    # bf16 keeps about 3 digits; a missing or doubled clipping or division is off by 50% or more
    assert ((u - e).norm() / e.norm()).item() < 3e-2


def test_dp_fsdp_on_one_gpu_trains_with_the_exact_update():
    strategy = DPFSDPStrategy(noise_multiplier=0.0, clipping="abadi", max_grad_norm=R, poisson_sampling=False)
    net, x, y, model, update = _fit("transformer", strategy=strategy)
    assert model.devices == {"cuda"}
    for u, e in zip(update, _expected(net, x, y)):
        assert ((u - e).norm() / e.norm()).item() < 1e-6


def test_physical_batch_cap_lowers_the_peak_memory():
    """The cap's purpose on a GPU: the allocator's peak falls when the activations of fewer examples live."""

    def peak(cap):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        strategy = DPAutoStrategy(noise_multiplier=1.0, poisson_sampling=False, max_physical_batch_size=cap)
        # the whole batch's activations (4096 x 4096 hidden, several copies) dwarf the parameters (8 MB)
        net = torch.nn.Sequential(torch.nn.Linear(512, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 3))
        model = Classifier(net, optimizer="sgd", lr=0.1)
        x, y = torch.randn(4096, 512), torch.randint(0, 3, (4096,))
        quiet_trainer(strategy=strategy, max_steps=1, accelerator="gpu").fit(
            model, loader(x, y, batch_size=4096)
        )
        return torch.cuda.max_memory_allocated()

    assert peak(128) < 0.5 * peak(None)
