"""Bad input: a clear error naming the fix, raised before the first optimizer step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_autodp import DPAutoStrategy, PrivacyBudget
from lightning_autodp.safeguards.batchnorm import BatchNormModeError


def _data(n=16):
    return torch.randn(n, 4), torch.randint(0, 3, (n,))


def _fit(model, strategy=None, data=None, **trainer_kwargs):
    x, y = _data()
    trainer = quiet_trainer(strategy=strategy or DPAutoStrategy(), max_steps=2, **trainer_kwargs)
    trainer.fit(model, data if data is not None else loader(x, y, batch_size=4))
    return trainer


class NoStepTaken(Classifier):
    """Fails the test if the optimizer ever steps."""

    def optimizer_step(self, *args, **kwargs):
        raise AssertionError("an optimizer step was taken before the error")


def test_batchnorm_points_to_groupnorm():
    """Refused in the first training step (its mode may change until then), before any update."""
    model = Classifier(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BatchNormModeError, match=r"BatchNorm1d.*GroupNorm.*ModuleValidator\.fix"):
        _fit(model)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_layer_without_per_sample_support():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.lstm(x.unsqueeze(1))[0][:, -1])

    with pytest.raises(ValueError, match=r"LSTM.*DPLSTM"):
        _fit(NoStepTaken(Recurrent()))


def test_manual_optimization():
    class Manual(NoStepTaken):
        def __init__(self):
            super().__init__(nn.Linear(4, 3))
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimization"):
        _fit(Manual())


def test_gradient_clip_val():
    with pytest.raises(ValueError, match=r"gradient_clip_val.*Remove gradient_clip_val"):
        _fit(NoStepTaken(nn.Linear(4, 3)), gradient_clip_val=1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": -0.5}, "noise_multiplier must be >= 0"),
        ({"clipping": "clamp"}, "Unknown clipping='clamp'.*'auto_s'"),
        ({"gamma": 0.0}, "gamma must be > 0 with clipping='psac'.*gamma=1"),
        ({"clipping": "auto_s", "gamma": 0.0}, "gamma must be > 0 with clipping='auto_s'.*gamma=0.01"),
        ({"gamma": -1.0}, "gamma must be > 0"),
        ({"clipping": "psac", "gamma": 0.0}, "gamma must be > 0 with clipping='psac'.*gamma=1"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"engine": "fast"}, "Unknown engine='fast'"),
        ({"loss_reduction": "none"}, "loss_reduction must be 'mean' or 'sum'"),
    ],
)
def test_bad_strategy_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPAutoStrategy(**kwargs)


def test_gamma_zero_is_fine_without_auto_s():
    DPAutoStrategy(clipping="auto_v", gamma=0.0)


def test_the_default_clipping_is_psac_with_r_1():
    strategy = DPAutoStrategy()
    assert (strategy.clipping, strategy.gamma) == ("psac", 1.0)  # measured: benchmarks/utility.py


def test_gamma_defaults_per_mode():
    assert DPAutoStrategy(clipping="auto_s").gamma == 0.01  # AUTO-S (Bu et al.)
    assert DPAutoStrategy(clipping="psac").gamma == 1.0  # PSAC's r (measured: --grid psac_r)
    assert DPAutoStrategy(clipping="psac", gamma=0.5).gamma == 0.5


def test_iterable_dataset_with_poisson_sampling():
    class Stream(IterableDataset):
        def __iter__(self):
            x, y = _data()
            return iter(zip(x, y))

    with pytest.raises(TypeError, match=r"IterableDataset.*map-style Dataset.*poisson_sampling=False"):
        _fit(NoStepTaken(nn.Linear(4, 3)), data=DataLoader(Stream(), batch_size=4))


def test_dataloader_without_batch_size():
    x, y = _data()
    data = DataLoader(TensorDataset(x, y), batch_size=None)
    with pytest.raises(ValueError, match=r"batch_size=None.*Give the DataLoader a batch_size"):
        _fit(NoStepTaken(nn.Linear(4, 3)), data=data)


def test_noise_multiplier_none_without_calibrating_callback():
    with pytest.raises(ValueError, match=r"noise_multiplier=None.*PrivacyBudget"):
        _fit(NoStepTaken(nn.Linear(4, 3)), strategy=DPAutoStrategy(noise_multiplier=None))


def test_unsupported_precision():
    with pytest.raises(ValueError, match=r"precision.*'32-true', '64-true', '16-mixed' or 'bf16-mixed'"):
        _fit(NoStepTaken(nn.Linear(4, 3)), precision="bf16-true")


def _assert_raises_before_any_update(model, error, match):
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        _fit(model, strategy=DPAutoStrategy(poisson_sampling=False))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_non_scalar_loss():
    class PerExampleLoss(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y, reduction="none")

    _assert_raises_before_any_update(PerExampleLoss(nn.Linear(4, 3)), (ValueError, RuntimeError), "scalar")


def test_nan_loss_stops_with_a_clear_message():
    class NaNLoss(Classifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    _assert_raises_before_any_update(NaNLoss(nn.Linear(4, 3)), FloatingPointError, "noise-only steps")


def test_parameter_untouched_by_the_loss_gets_noise_only():
    class Unused(Classifier):
        def __init__(self):
            super().__init__(nn.Linear(4, 3), lr=1.0)
            self.unused = nn.Linear(4, 4)

    model = Unused()
    before = model.unused.weight.detach().clone()
    _fit(model, strategy=DPAutoStrategy(noise_multiplier=1.0))
    assert not torch.equal(model.unused.weight, before)


def test_several_optimizers_are_refused():
    class TwoOptimizers(NoStepTaken):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.Adam(self.parameters())]

    # Lightning's automatic optimization takes one optimizer; dp_auto needs automatic optimization.
    with pytest.raises(RuntimeError, match="multiple optimizers is only supported with manual optimization"):
        _fit(TwoOptimizers(nn.Linear(4, 3)))


@pytest.mark.parametrize("target", [0.0, -1.0, float("inf")])
def test_target_epsilon_must_be_positive(target):
    with pytest.raises(ValueError, match=r"target_epsilon must be a positive number \(e\.g\. 3\.0\)"):
        PrivacyBudget(target_epsilon=target)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_must_lie_in_zero_one(delta):
    with pytest.raises(ValueError, match=r"delta must lie in \(0, 1\).*well below 1/N"):
        PrivacyBudget(target_epsilon=1.0, delta=delta)


def test_unknown_accountant():
    with pytest.raises(ValueError, match="Unknown accountant='gdp'. Use one of 'prv', 'rdp'"):
        PrivacyBudget(target_epsilon=1.0, accountant="gdp")
