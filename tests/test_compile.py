"""A torch.compile'd LightningModule under dp_auto: the update of the per-example loop, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, make_case, quiet_trainer
from reference import per_example_gradients, reference_clipped_mean

from lightning_autodp import DPAutoStrategy
from lightning_autodp.mechanism.step import DPStep

R = 1.7  # between the examples' gradient norms (1.2 to 3.1): Abadi clips some of them, not all


def _compiled_update(
    case: str, engine: str, backend: str, cap: int | None = None, device: str = "cpu", safeguards: bool = True
) -> tuple[list, list]:
    net, x, y = make_case(case, n=8)
    model = Classifier(copy.deepcopy(net), optimizer="sgd", lr=1.0)
    before = [p.detach().clone() for p in model.net.parameters()]
    strategy = DPAutoStrategy(
        noise_multiplier=0.0, clipping="abadi", max_grad_norm=R, poisson_sampling=False, engine=engine,
        max_physical_batch_size=cap, verify=safeguards, run_checks=safeguards,
    )  # fmt: skip
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    trainer = quiet_trainer(
        strategy=strategy, precision="64-true", max_steps=1, accelerator="gpu" if device == "cuda" else "cpu"
    )
    trainer.fit(compiled, loader(x, y, batch_size=8))
    assert strategy.steps == 1
    update = [b.to(a.device) - a.detach() for b, a in zip(before, model.net.parameters())]
    update = [u.cpu() for u in update]

    netd = copy.deepcopy(net).double()
    xd = x.double() if x.is_floating_point() else x

    def loss_i(m, i):
        return F.cross_entropy(m(xd[i : i + 1]), y[i : i + 1])

    expected = reference_clipped_mean(per_example_gradients(netd, loss_i, 8), "abadi", R, 0.01, 8)
    return update, expected


def _relative_errors(update, expected) -> list[float]:
    return [((u - e).norm() / e.norm()).item() for u, e in zip(update, expected)]


@pytest.mark.parametrize(
    ("case", "engine", "backend"),
    [("linear", "bk", "eager"), ("transformer", "bk", "aot_eager"), ("linear", "hooks", "eager")],
)  # fmt: skip
def test_compiled_module_takes_the_per_example_loop_update(case, engine, backend):
    update, expected = _compiled_update(case, engine, backend)
    assert max(_relative_errors(update, expected)) < 1e-6  # tests/test_strategy.py's oracle, tighter


def test_compiled_module_with_a_physical_batch_cap():
    update, expected = _compiled_update("linear", "bk", "aot_eager", cap=3)
    assert max(_relative_errors(update, expected)) < 1e-6


def test_compiled_module_without_clipping_is_caught(monkeypatch):
    """Mutation: clipping weights of 1 (no clipping) under compile must fail the comparison.

    The safeguards are off so that the comparison itself is what fails; with them on, the clipping
    probe stops this run before the update (tests/test_safeguard_faults.py).
    """
    monkeypatch.setattr(DPStep, "clip_weights", lambda self, engine, scale, check_finite=True: torch.full(
        (engine.batch_size,), 1.0 / scale, dtype=torch.float64))  # fmt: skip
    update, expected = _compiled_update("linear", "bk", "aot_eager", safeguards=False)
    assert max(_relative_errors(update, expected)) > 1e-2


def test_ghost_under_compile_is_refused_before_training_naming_the_fix():
    with pytest.raises(ValueError, match="engine='bk'.*donated_buffer = False"):
        _compiled_update("linear", "ghost", "aot_eager")


def test_ghost_under_compile_without_donated_buffers():
    import torch._functorch.config as functorch_config

    with functorch_config.patch(donated_buffer=False):  # torch's own config patch, undone exactly
        update, expected = _compiled_update("linear", "ghost", "aot_eager")
    assert max(_relative_errors(update, expected)) < 1e-6


@pytest.mark.cuda
def test_inductor_compiled_module_on_gpu_takes_the_per_example_loop_update():
    update, expected = _compiled_update("transformer", "bk", "inductor", device="cuda")
    assert max(_relative_errors(update, expected)) < 1e-6
