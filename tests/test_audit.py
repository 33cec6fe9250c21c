"""One-run privacy auditing: the bound against an independent computation, and audits of real runs.

The training tests run a small MLP for 20 steps with m=1000 gradient canaries (a few seconds each):
a correct run must stay below the accounted epsilon, and each deliberate breakage of the mechanism
(noise scaled down 10x, clipping skipped, every rank adding a noise share that does not add up)
must push the empirical lower bound above the claimed epsilon.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

import lightning_autodp.integration.report as report_module
from lightning_autodp import DPAutoStrategy, PrivacyBudget
from lightning_autodp.integration.report import PrivacyReport
from lightning_autodp.mechanism.accounting import Accountant
from lightning_autodp.mechanism.noise import NoiseSource
from lightning_autodp.mechanism.observers import StepContext
from lightning_autodp.mechanism.sampling import DistributedPoissonBatchSampler
from lightning_autodp.mechanism.step import DPStep
from lightning_autodp.safeguards.audit import (
    GradientCanaries,
    PrivacyAudit,
    audit_ceiling,
    audit_scores,
    canaries_needed,
    epsilon_lower_bound,
    max_certifiable_epsilon,
    p_value,
)
from lightning_autodp.safeguards.audit.__main__ import main
from lightning_autodp.safeguards.audit.bound import SAMPLING_FALSE_ALARM, guess_choices
from tests.models import Classifier, loader, quiet_trainer
from tests.reference import reference_factors

# ---------------------------------------------------------------------------- the bound


def reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value written out with exact binomial coefficients (no scipy)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    beta = math.fsum(pmf[v:])
    alpha = max((math.fsum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(beta + alpha * delta * 2 * m, 1.0)


def reference_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float, step: float = 1e-3
) -> float:
    """The largest eps on a grid of ``step`` whose p-value is below 1 - confidence (a scan: coarse,
    then fine; the p-value decreases in eps)."""
    if reference_p_value(m, r, v, 0.0, delta) >= 1 - confidence:
        return 0.0
    eps = 0.0
    for grid in (0.1, step):
        while reference_p_value(m, r, v, eps + grid, delta) < 1 - confidence:
            eps += grid
    return eps


@pytest.mark.parametrize(
    "m, r, v, delta",
    [
        (100, 100, 100, 0.0),
        (100, 100, 100, 1e-5),
        (200, 60, 55, 1e-5),
        (500, 200, 150, 1e-3),
        (50, 20, 12, 0.0),
    ],
)
def test_lower_bound_matches_brute_force(m, r, v, delta):
    for eps in (0.0, 0.5, 2.0):
        assert p_value(m, r, v, eps, delta) == pytest.approx(
            reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15
        )
    got = epsilon_lower_bound(m, r, v, delta, confidence=0.95)
    want = reference_lower_bound(m, r, v, delta, confidence=0.95)
    assert want <= got < want + 1e-3 + 1e-6
    if got > 0:
        assert reference_p_value(m, r, v, got, delta) < 0.05  # the bound itself is rejected at 95%


def test_delta_term_lowers_the_bound():
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-3) < epsilon_lower_bound(1000, 1000, 1000, 0.0) - 0.5


def test_random_guessing_certifies_nothing_and_perfect_guessing_reaches_the_ceiling():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    assert audit_scores(rng.standard_normal(1000), included, 1e-5).epsilon_lower_bound == 0.0
    perfect = audit_scores(included.astype(float), included, 1e-5)
    assert 0.8 * perfect.max_certifiable < perfect.epsilon_lower_bound <= perfect.max_certifiable
    assert perfect.max_certifiable <= max_certifiable_epsilon(1000, 1e-5, 0.95) + 1.0


def test_audit_scores_counts_guesses_and_applies_bonferroni():
    rng = np.random.default_rng(1)
    included = rng.random(400) < 0.5
    scores = included * 1.5 + rng.standard_normal(400)
    result = audit_scores(scores, included, 1e-5, confidence=0.95)
    order = np.argsort(-scores)
    right_in = included[order[: result.k_in]].sum()
    right_out = (~included[order[len(order) - result.k_out :]]).sum() if result.k_out else 0
    assert result.correct == right_in + right_out and result.guesses == result.k_in + result.k_out
    corrected = 1 - 0.05 / len(guess_choices(400))
    assert result.choices == len(guess_choices(400))
    assert result.epsilon_lower_bound == pytest.approx(
        reference_lower_bound(400, result.guesses, result.correct, 1e-5, corrected), abs=2e-3
    )


def test_bound_is_sound_for_randomized_response():
    """An eps-DP mechanism (randomized response on each canary's bit) is certified above eps in at
    most about 5% of runs."""
    eps, m, trials = 1.0, 500, 60
    rng = np.random.default_rng(2)
    above = 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        scores = np.where(truthful == included, 1.0, -1.0) + 1e-6 * rng.standard_normal(m)
        above += audit_scores(scores, included, 0.0).epsilon_lower_bound > eps
    assert above <= 8  # binomial(60, 0.05) exceeds 8 with probability < 1%


# ---------------------------------------------------------------------------- audited training runs

SIGMA, STEPS_PER_EPOCH, EPOCHS, N, BATCH = 6.0, 2, 10, 64, 32


@functools.cache
def _claimed_epsilon(accountant: str = "prv") -> float:
    return Accountant(accountant, 1e-5).epsilon([(SIGMA, BATCH / N, STEPS_PER_EPOCH * EPOCHS)])


def audited_run(
    monkeypatch: pytest.MonkeyPatch | None = None,
    mutation: str | None = None,
    budget: bool = False,
    extra_callbacks: tuple = (),
    plant=None,
    **trainer_kwargs,
) -> PrivacyAudit:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 16, generator=g), torch.randint(0, 3, (N,), generator=g)
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 3))  # 1283 coordinates
    audit = PrivacyAudit(m=1000, seed=0, delta=None if budget else 1e-5)
    callbacks = (
        [PrivacyBudget(target_epsilon=3.0, delta=1e-5, accountant="rdp"), audit] if budget else [audit]
    )
    intact = mutation is None and plant is None  # a broken run is audited alone: no verify, no checks
    strategy = DPAutoStrategy(noise_multiplier=SIGMA, clipping="psac", verify=intact, run_checks=intact)
    if mutation is not None:
        assert monkeypatch is not None
        apply_mutation(monkeypatch, mutation)
    if plant is not None:
        plant()
    trainer = quiet_trainer(
        strategy=strategy, max_epochs=EPOCHS, callbacks=[*callbacks, *extra_callbacks], **trainer_kwargs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Classifier(net, lr=0.5), loader(x, y, BATCH))
    assert strategy.steps == STEPS_PER_EPOCH * EPOCHS
    if budget:
        assert audit.accounted_epsilon == pytest.approx(_claimed_epsilon("rdp"), rel=1e-6)
    return audit


SIMULATED_RANKS = 32


def apply_mutation(monkeypatch: pytest.MonkeyPatch, mutation: str) -> None:
    gaussian = NoiseSource.gaussian
    if mutation == "noise_scaled_down_10x":
        monkeypatch.setattr(NoiseSource, "gaussian", lambda self, std, like: gaussian(self, std / 10, like))
    elif mutation == "clipping_skipped":
        # every example (data and canaries alike) enters the sum unclipped: weight 1 / scale
        def unclipped(self, engine, scale, check_finite=True):
            return torch.ones(engine.batch_size, dtype=torch.float32) / scale

        monkeypatch.setattr(DPStep, "clip_weights", unclipped)
    elif mutation == "noise_share_on_every_rank":
        # Each of W ranks adds its own draw with std sigma*R/W, as if the draws were shared and their
        # sum had std sigma*R; independent draws sum to sigma*R/sqrt(W). Simulated in one process:
        # the noise that reaches the all-reduced sum is the sum of W independent shares.
        def every_rank(self, std, like):
            return sum(gaussian(self, std / SIMULATED_RANKS, like) for _ in range(SIMULATED_RANKS))

        monkeypatch.setattr(NoiseSource, "gaussian", every_rank)
    else:
        raise KeyError(mutation)


def test_correct_run_stays_below_the_accounted_epsilon(tmp_path, monkeypatch):
    drawn = {}
    draw = report_module.draw_privacy_report
    monkeypatch.setattr(
        report_module, "draw_privacy_report", lambda *a, **k: drawn.update(k) or draw(*a, **k)
    )
    report = PrivacyReport(metric="val_loss")
    audit = audited_run(budget=True, extra_callbacks=(report,), default_root_dir=tmp_path)
    result = audit.result
    assert result is not None and result.m == 1000 and result.delta == 1e-5
    assert 0.0 <= result.epsilon_lower_bound < _claimed_epsilon() < audit.accounted_epsilon  # PRV < RDP
    # the audit has the power to catch the breakages below: its ceiling is far above the claim
    assert result.max_certifiable > 2 * audit.accounted_epsilon
    # shown beside the accounted epsilon in the privacy report
    assert drawn["audit_lower_bound"] == result.epsilon_lower_bound and report.path.exists()


def test_cli_audits_digits(capsys):
    main(["--epochs", "2", "--m", "200", "--target-epsilon", "4"])
    out = capsys.readouterr().out
    assert re.search(r"accounted epsilon \d\.\d+ \(delta=1e-05\), test accuracy 0\.\d+", out)


@pytest.mark.parametrize(
    "mutation", ["noise_scaled_down_10x", "clipping_skipped", "noise_share_on_every_rank"]
)
def test_broken_mechanism_is_caught(monkeypatch, mutation):
    audit = audited_run(monkeypatch, mutation)
    assert audit.result.epsilon_lower_bound > _claimed_epsilon()


def _canary_context(dp_step: DPStep, rank: int = 0, sampler=None, q: float = 0.3) -> StepContext:
    return StepContext(
        dp_step=dp_step, params=dp_step.params, sigma=1.0, max_grad_norm=1.0, sample_rate=q,
        dataset_size=100, sampler=sampler, step=0, fit_step=0, rank=rank, world_size=2,
    )  # fmt: skip


def test_canaries_are_poisson_sampled_and_clipped():
    """Against an independent reference: only included canaries, each sampled with probability q per
    step, each adding its clipped Dirac gradient C_j * N * sign_j on its own coordinate, through the
    DP step's own clipping; they are not counted as examples of the step."""
    params = [nn.Parameter(torch.zeros(30, 20)), nn.Parameter(torch.zeros(50))]
    q, norm, steps = 0.3, 100.0, 200
    canaries = GradientCanaries(400, params, sample_rate=q, norm=norm, seed=3)
    dp_step = DPStep(params, "psac", max_grad_norm=1.0, gamma=1.0)
    for _ in range(steps):
        canaries.contribute(_canary_context(dp_step, q=q))
    canaries.contribute(_canary_context(DPStep(params, "psac", 1.0, 1.0), rank=1))  # other ranks add nothing
    assert dp_step.examples == 0
    summed = dp_step.summed
    flat = torch.cat([summed[p].reshape(-1) for p in params]).double()
    starts = [0, params[0].numel()]
    owners = zip(canaries.param_index.tolist(), canaries.offset.tolist())
    coord = torch.tensor([starts[i] + o for i, o in owners])
    assert len(set(coord.tolist())) == 400  # one coordinate each
    counts = canaries.sampled_count
    assert (counts[~canaries.included] == 0).all()
    n_in = int(canaries.included.sum())
    mean, sd = q * steps * n_in, math.sqrt(q * (1 - q) * steps * n_in)
    assert abs(int(counts.sum()) - mean) < 5 * sd
    assert canaries.draws == {q: [steps * n_in, int(counts.sum())]}
    factor = reference_factors(torch.tensor([norm]), "psac", 1.0, 1.0)[0]
    want = torch.zeros_like(flat)
    want[coord] = factor * norm * canaries.sign * counts.double()
    torch.testing.assert_close(flat, want, rtol=1e-6, atol=1e-9)


def test_canaries_are_drawn_by_the_data_sampler():
    """The canaries' draws are the sampler's inclusion_mask at the sampler's rate: a sampler drawing at
    1.25q (while q is accounted) shows in the canaries' realised rate, flagged below 1e-6."""
    params = [nn.Parameter(torch.zeros(2000))]
    q = 0.1
    sampler = DistributedPoissonBatchSampler(num_samples=1000, sample_rate=q)
    for factor, flagged in ((1.0, False), (1.25, True)):
        canaries = GradientCanaries(1000, params, sample_rate=q, norm=100.0, seed=1)
        dp_step = DPStep(params, "psac", 1.0, 1.0)
        sampler.sample_rate = q * factor  # the draw, not the accounted rate, changes
        for _ in range(100):
            canaries.contribute(_canary_context(dp_step, sampler=sampler, q=q))
        p, realised, accounted = canaries.sampling_p_value()
        assert accounted == q and realised == pytest.approx(q * factor, rel=0.1)
        assert (p < SAMPLING_FALSE_ALARM) is flagged, p


def test_audit_needs_a_delta_and_dp_auto():
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    model = Classifier(nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"PrivacyAudit\(delta=\.\.\.\)"):
        quiet_trainer(strategy="dp_auto", max_epochs=1, callbacks=[PrivacyAudit(m=4)]).fit(
            model, loader(x, y, 4)
        )
    with pytest.raises(TypeError, match="strategy='dp_auto'"):
        quiet_trainer(max_epochs=1, callbacks=[PrivacyAudit(m=4, delta=1e-5)]).fit(model, loader(x, y, 4))
    with pytest.raises(ValueError, match=r"1 <= m <= the number of trainable coordinates \(10\)"):
        quiet_trainer(strategy="dp_auto", max_epochs=1, callbacks=[PrivacyAudit(m=11, delta=1e-5)]).fit(
            model, loader(x, y, 4)
        )


def test_the_cli_defaults_can_show_a_violation():
    """The CLI's default run sits below its audit's ceiling: a broken mechanism can be flagged."""
    import inspect

    from lightning_autodp.safeguards.audit.__main__ import run_digits

    defaults = {k: v.default for k, v in inspect.signature(run_digits).parameters.items()}
    ceiling = audit_ceiling(defaults["audit_m"], defaults["delta"])
    assert ceiling > defaults["target_epsilon"]
    assert defaults["clipping"] == "psac"


def test_a_result_below_its_ceiling_says_what_it_would_take():
    m, ceiling = canaries_needed(5.2, 1e-5)
    assert m is not None and ceiling > 5.2
    assert max_certifiable_epsilon(m, 1e-5, 1 - 0.05 / len(guess_choices(m))) == ceiling  # independent path
    smaller = int(m / 1.1)
    assert audit_ceiling(smaller, 1e-5) <= 5.2  # m is the first on the grid that can
    result = audit_scores(np.ones(1000), np.ones(1000, dtype=bool), 1e-5)
    assert "This audit cannot show a violation of epsilon=5.200: its ceiling 5.00 is below it; " in (
        result.summary(5.2)
    )
    assert f"PrivacyAudit(m={m}) could" in result.summary(5.2)
    assert "no number of canaries up to 20000 lifts the ceiling above 5.4" in result.summary(7.97)
    assert "cannot show" not in result.summary(4.0)
