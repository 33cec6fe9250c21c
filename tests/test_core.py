"""The framework-free DP step (lightning_autodp.mechanism.step) driven without a Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_autodp.engines import make_engine
from lightning_autodp.mechanism.noise import NoiseSource
from lightning_autodp.mechanism.step import DPStep, PrivacyLedger, all_reduce_in_buckets
from tests.models import make_case
from tests.reference import per_example_gradients, reference_clipped_mean
from tests.test_accounting import opacus_epsilon


def _reference(net, x, y):
    grads = per_example_gradients(net, lambda m, i: F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]), len(x))
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in grads])
    return grads, norms


@pytest.mark.parametrize("engine_name", ["hooks", "bk", "ghost"])
@pytest.mark.parametrize("case", ["linear", "conv2d", "transformer"])
def test_dp_step_equals_the_per_example_loop(case, engine_name):
    net, x, y = make_case(case)
    net = net.double()
    x = x.double() if x.is_floating_point() else x
    grads, norms = _reference(net, x, y)
    bound = norms.median().item()
    expected = reference_clipped_mean(grads, "auto_s", bound, 0.01, batch_size=len(x))

    model = copy.deepcopy(net)
    engine = make_engine(engine_name, model)
    step = DPStep(engine.params, "auto_s", max_grad_norm=bound, gamma=0.01)
    micro_batches = 2  # two micro-batches of 4 accumulated, each mean loss divided by 2
    for chunk_x, chunk_y in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        with engine.capturing():
            loss = F.cross_entropy(model(chunk_x), chunk_y) / micro_batches
            loss.backward(retain_graph=engine.needs_backward_root)
        engine.set_backward_root(loss)
        step.clip_and_accumulate(engine, scale=1.0 / micro_batches / len(chunk_x))
    ledger = PrivacyLedger()
    step.privatize(sigma=0.0, q=0.5, noise=None, ledger=ledger, divisor=None)
    engine.remove()
    for p, e in zip(engine.params, expected):
        # the clipping factors are float32 by design (lightning_autodp.mechanism.clipping): ~1e-7 relative
        assert ((p.grad - e).norm() / e.norm()).item() < 1e-6
    assert ledger.segments == [(0.0, 0.5, 1)]


def test_noise_std_and_ledger_at_the_place_of_the_noise():
    sigma, bound, divisor = 1.5, 2.0, 8.0
    param = torch.nn.Parameter(torch.zeros(200, 100))
    step = DPStep([param], "auto_s", max_grad_norm=bound, gamma=0.01)
    ledger = PrivacyLedger()
    step.privatize(sigma=sigma, q=0.1, noise=NoiseSource(seed=3), ledger=ledger, divisor=divisor)
    assert abs(param.grad.std().item() / (sigma * bound / divisor) - 1) < 0.03
    # a rank without the noise source adds nothing but still accounts the step
    step.privatize(sigma=sigma, q=0.1, noise=None, ledger=ledger, divisor=divisor)
    assert torch.count_nonzero(param.grad) == 0
    assert ledger.segments == [(sigma, 0.1, 2)]


def test_ledger_segments_epsilon_and_state():
    ledger = PrivacyLedger()
    for _ in range(30):
        ledger.record(1.0, 0.05)
    for _ in range(20):
        ledger.record(1.0, 0.1)  # a reloaded loader: q changed
    ledger.record(1.0, 0.1)
    assert ledger.segments == [(1.0, 0.05, 30), (1.0, 0.1, 21)]
    assert ledger.steps == 51 and ledger.last == (1.0, 0.1)
    assert ledger.epsilon(1e-5, "rdp") == pytest.approx(opacus_epsilon("rdp", ledger.segments), rel=1e-9)
    restored = PrivacyLedger()
    restored.load_state_dict(copy.deepcopy(ledger.state_dict()))
    assert restored.segments == ledger.segments
    unknown = PrivacyLedger()
    unknown.record(1.0, None)
    with pytest.raises(ValueError, match="poisson_sampling=True"):
        unknown.epsilon(1e-5)


def test_bucketed_reduce_equals_one_flat_reduce_and_bounds_each_bucket():
    g = torch.Generator().manual_seed(0)
    shapes = [(300,), (10, 10), (1000,), (7,), (3, 3), (25, 20)]
    tensors = [torch.randn(s, generator=g) for s in shapes] + [torch.randn(40, generator=g).double()]
    expected = [3.0 * t for t in tensors]  # a sum over three ranks holding the same tensors
    sizes = []

    def reduce(flat):
        sizes.append(flat.numel() * flat.element_size())
        flat.mul_(3.0)

    bucket_mb = 2000 / 2**20  # 2000 bytes: 500 float32
    calls = all_reduce_in_buckets(tensors, reduce, bucket_mb=bucket_mb)
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)
    assert calls == len(sizes) > 2
    # every bucket within the bound, except a single tensor larger than a bucket (reduced in place)
    assert all(size <= 2000 for size in sizes if size != 1000 * 4)
    assert sizes.count(1000 * 4) == 1
    # float64 never shares a buffer with float32
    assert sizes[-1] == 40 * 8
