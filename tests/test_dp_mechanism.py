"""DPMechanism, the one object both strategies drive, driven without a Trainer."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_autodp.integration.dp_mechanism import DPConfig, DPMechanism
from lightning_autodp.mechanism.calibration import CalibrationRequest, NoiseCalibrator
from lightning_autodp.mechanism.observers import StepObserver
from tests.models import make_case
from tests.reference import per_example_gradients, reference_clipped_mean

N = 32


def _run_one_step(mechanism: DPMechanism, model, x, y, micro_batches: int = 2, rank: int = 0) -> None:
    """What a strategy does for one optimizer step: capture, backward, accumulate; privatize."""
    engine = mechanism.engine
    for chunk_x, chunk_y in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        with mechanism.capturing(chunk_x):
            loss = F.cross_entropy(model(chunk_x), chunk_y) / micro_batches
            loss.backward(retain_graph=engine.needs_backward_root)
        engine.set_backward_root(loss)
        mechanism.accumulate(micro_batches)
    mechanism.privatize(rank=rank, world_size=1, reduce=None)


@pytest.mark.parametrize("engine", ["bk", "ghost", "hooks"])
@pytest.mark.parametrize("clipping", ["psac", "abadi"])
def test_the_mechanism_hands_the_optimizer_the_clipped_mean_of_the_per_example_loop(engine, clipping):
    net, x, y = make_case("linear")
    net = net.double()
    x = x.double()
    grads = per_example_gradients(net, lambda m, i: F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]), len(x))
    mechanism = DPMechanism(
        DPConfig(noise_multiplier=0.0, clipping=clipping, max_grad_norm=0.5, engine=engine)
    )
    mechanism.begin_fit(calibrator=None, run_seed=0)
    model = copy.deepcopy(net)
    mechanism.attach(model, rank=0)
    loader = DataLoader(TensorDataset(torch.zeros(N, 1)), batch_size=2)
    mechanism.sample(loader, micro_batches=2, world_size=1, rank=0)  # q = 4 / 32, B = qN = 4 (|S| = 8)
    assert mechanism.sample_rate == 4 / N and mechanism.expected_batch_size == 4
    _run_one_step(mechanism, model, x, y)
    gamma = mechanism.config.gamma
    expected = reference_clipped_mean(grads, clipping, 0.5, gamma, batch_size=4)  # divided by B, not |S|
    for p, e in zip(mechanism.engine.params, expected):
        assert ((p.grad - e).norm() / e.norm()).item() < 1e-5
    assert mechanism.ledger.segments == [(0.0, 4 / N, 1)]
    mechanism.detach()
    assert mechanism.engine is None and mechanism.ledger.steps == 1


def test_only_rank_zero_draws_the_noise_and_every_rank_accounts():
    torch.manual_seed(0)
    net = torch.nn.Linear(200, 50)
    x, y = torch.randn(8, 200), torch.randint(0, 50, (8,))
    grads = {}
    for rank in (0, 1):
        mechanism = DPMechanism(DPConfig(noise_multiplier=2.0, engine="bk", seed=5, run_checks=False))
        mechanism.begin_fit(calibrator=None, run_seed=0)
        model = copy.deepcopy(net)
        mechanism.attach(model, rank=rank)
        mechanism.sample(DataLoader(TensorDataset(torch.zeros(N, 1)), batch_size=8), 1, world_size=1, rank=0)
        _run_one_step(mechanism, model, x, y, micro_batches=1, rank=rank)
        grads[rank] = torch.cat([p.grad.flatten() for p in mechanism.engine.params])
        assert mechanism.ledger.segments == [(2.0, 8 / N, 1)]
    # rank 1 holds the clipped mean alone: PSAC bounds each C_i g_i by R, so its norm is <= |S| R / B = 1
    assert grads[1].norm().item() <= 1.0 + 1e-6
    # rank 0 adds sigma R / B = 2 * 1 / 8 to every coordinate
    noise = grads[0] - grads[1]
    assert abs(noise.std().item() / 0.25 - 1) < 6 / (2 * noise.numel()) ** 0.5


class _Calibrator(NoiseCalibrator):
    def __init__(self) -> None:
        self.requests: list[CalibrationRequest] = []

    def calibrate_noise_multiplier(self, request: CalibrationRequest) -> float:
        self.requests.append(request)
        return 0.75


def test_sigma_has_one_source_per_fit_in_a_fixed_order():
    # a number wins over the default; the calibrator is asked once, with q, planned steps and spent
    fixed = DPMechanism(DPConfig(noise_multiplier=1.5))
    fixed.begin_fit(calibrator=None, run_seed=0)
    assert fixed.settle_sigma(lambda: 10) == 1.5
    default = DPMechanism(DPConfig())
    default.begin_fit(calibrator=None, run_seed=0)
    assert default.settle_sigma(lambda: 10) == 1.0
    calibrator = _Calibrator()
    calibrated = DPMechanism(DPConfig())
    calibrated.begin_fit(calibrator=calibrator, run_seed=0)
    calibrated.sample(DataLoader(TensorDataset(torch.zeros(N, 1)), batch_size=4), 1, world_size=1, rank=0)
    assert calibrated.settle_sigma(lambda: 10) == 0.75
    assert calibrated.settle_sigma(lambda: 99) == 0.75  # asked once
    assert [(r.sample_rate, r.planned_steps, r.spent) for r in calibrator.requests] == [(4 / N, 10, ())]
    # a restored ledger's sigma wins over the calibrator; its seed over the run's
    calibrated.ledger.record(0.75, 4 / N)
    calibrated.seed = 123
    resumed = DPMechanism(DPConfig())
    resumed.load_state_dict(copy.deepcopy(calibrated.state_dict()))
    resumed.begin_fit(calibrator=_Calibrator(), run_seed=0)
    assert resumed.calibrator is None and resumed.sigma == 0.75 and resumed.seed == 123
    with pytest.raises(ValueError, match="needs a callback that calibrates it"):
        DPMechanism(DPConfig(noise_multiplier=None)).begin_fit(calibrator=None, run_seed=0)


def test_sigma_cannot_change_after_the_first_step_of_a_fit():
    net, x, y = make_case("linear")
    mechanism = DPMechanism(DPConfig(noise_multiplier=1.0, engine="bk"))
    mechanism.begin_fit(calibrator=None, run_seed=0)
    model = copy.deepcopy(net)
    mechanism.attach(model, rank=0)
    mechanism.sample(DataLoader(TensorDataset(torch.zeros(N, 1)), batch_size=8), 1, world_size=1, rank=0)
    mechanism.set_sigma(2.0)  # before the first step: allowed
    _run_one_step(mechanism, model, x, y, micro_batches=1)
    with pytest.raises(RuntimeError, match="cannot change after the first optimizer step"):
        mechanism.set_sigma(3.0)
    assert mechanism.ledger.segments == [(2.0, 8 / N, 1)]


def test_observers_see_every_phase_of_the_step_in_order():
    calls = []

    class Recorder(StepObserver):
        def on_fit_start(self, ctx):
            calls.append("fit_start")

        def contribute(self, ctx):
            calls.append("contribute")

        def before_noise(self, ctx):
            calls.append("before_noise")

        def on_batch_sampled(self, ctx, examples):
            calls.append(("sampled", examples))

        def after_privatize(self, ctx, divisor, examples):
            calls.append(("privatized", divisor))

        def after_step(self, ctx, optimizer):
            calls.append("after_step")

    net, x, y = make_case("linear")
    mechanism = DPMechanism(
        DPConfig(noise_multiplier=0.0, engine="bk", run_checks=False), observers=[Recorder()]
    )
    mechanism.begin_fit(calibrator=None, run_seed=0)
    model = copy.deepcopy(net)
    mechanism.attach(model, rank=0)
    mechanism.sample(DataLoader(TensorDataset(torch.zeros(N, 1)), batch_size=8), 1, world_size=1, rank=0)
    _run_one_step(mechanism, model, x, y, micro_batches=1)
    mechanism.after_step(torch.optim.SGD(model.parameters(), lr=0.1))
    mechanism.after_step(torch.optim.SGD(model.parameters(), lr=0.1))  # once per privatized step
    assert calls == [
        "fit_start", "contribute", "before_noise", ("sampled", len(x)), ("privatized", 8.0), "after_step"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "fast"}, "Unknown engine='fast'"),
        ({"loss_reduction": "avg"}, "loss_reduction must be 'mean' or 'sum'"),
        ({"seed": 1.5}, "seed must be an int or None"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb must be a positive number"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0 and finite"),
        ({"max_physical_batch_size": 0}, "max_physical_batch_size must be an integer >= 1"),
    ],
)
def test_the_configuration_is_validated_once_where_it_is_owned(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DPConfig(**kwargs)


def test_the_configuration_resolves_gamma_and_is_read_only():
    assert DPConfig().gamma == 1.0 and DPConfig(clipping="auto_s").gamma == 0.01
    with pytest.raises(AttributeError):
        DPConfig().clipping = "abadi"  # type: ignore[misc]
    assert dataclasses.replace(DPConfig(), engine="bk").engine == "bk"
