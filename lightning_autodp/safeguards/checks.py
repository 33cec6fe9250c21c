r"""Run-time checks against silent privacy failures, run once at the first optimizer step.

A DP bug does not stop training: the model still learns. :class:`FirstStepChecks` looks at the
first optimizer step of every ``fit`` (on by default, ``DPAutoStrategy(run_checks=False)`` turns
it off) and stops training with an error naming what is wrong when

1. **a trainable parameter escapes the mechanism**: it is in an optimizer with
   ``requires_grad=True`` but dp_auto neither clips nor noises it (e.g. adapters unfrozen after
   the strategy was set up: their raw, unclipped gradients would reach the optimizer), or a handled
   parameter received neither a clipped contribution nor noise (only possible with ``sigma = 0``:
   a warning);
2. **the noise that entered has the wrong scale**: from the draw itself. With :math:`s_p` the
   clipped sums (all ranks) before noise and :math:`\tilde s_p = B\,\tilde g_p` the sums the
   optimizer receives, the noise that entered is :math:`\xi = \tilde s - s` over all :math:`n`
   coordinates. Under the claim :math:`\xi \sim N(0, \sigma^2R^2 I_n)`,
   :math:`S = \|\xi\|^2/(\sigma R)^2 \sim \chi^2_n`, and the check fails when :math:`S` falls
   outside the central :math:`1 - 10^{-6}` interval of :math:`\chi^2_n`. The test is exact for
   every :math:`n`; its power grows with :math:`n`: the relative error of the measured std is
   about :math:`1/\sqrt{2n}`, so a model with :math:`10^4` trainable coordinates detects a noise
   std off by about 5% and more (:math:`\approx 5.3/\sqrt{2n}`). Under DDP the sums are all-reduced,
   so this measures the noise of the whole world: noise added on every rank, or a per-rank share
   that does not add up to :math:`\sigma R`, fails it;
3. **the parameters did not change** after the step although they received a non-zero gradient and
   their optimizer group has ``lr > 0`` (a step applied to copies, an optimizer that never sees the
   gradients). Groups with ``lr == 0`` are not checked (nothing to see); a step skipped by the
   GradScaler (inf/NaN) moves the check to the next step;
4. **the sampling rate is not the accounted one**: the Poisson sampler's ``sample_rate``, the
   strategy's ``q`` and the ``q`` (and sigma) of the running accounting segment of a
   :class:`~lightning_autodp.PrivacyBudget` must agree; and the number of examples in the first
   step (all ranks) must be plausible under :math:`\mathrm{Binomial}(N, q)` (two-sided p-value
   above :math:`10^{-6}`), which catches a sampler that ignores ``q``.

Cost: once per ``fit``, one extra copy of the clipped sums, one all-reduce of them under DDP, and
two float64 reductions per parameter; nothing at later steps.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from scipy import stats
from torch import Tensor, nn

from lightning_autodp.mechanism.sharded import local_part

if TYPE_CHECKING:
    from lightning_autodp.integration.strategy import DPAutoStrategy

#: false-alarm probability of each statistical check (noise scale, batch size)
FALSE_ALARM = 1e-6


class PrivacyCheckError(RuntimeError):
    """A run-time check found the DP mechanism not doing what is accounted."""


def noise_scale_interval(n: int, false_alarm: float = FALSE_ALARM) -> tuple[float, float]:
    r"""The accepted range of the measured ratio :math:`\hat s / (\sigma R)` for ``n`` coordinates.

    :math:`\hat s^2 = \|\xi\|^2 / n` and :math:`n \hat s^2/(\sigma R)^2 \sim \chi^2_n`: the bounds are
    :math:`\sqrt{\chi^2_{n}(\alpha/2)/n}` and :math:`\sqrt{\chi^2_{n}(1-\alpha/2)/n}`.
    """
    low = stats.chi2.ppf(false_alarm / 2, n) / n
    high = stats.chi2.isf(false_alarm / 2, n) / n
    return math.sqrt(low), math.sqrt(high)


def check_noise_scale(noise_sq_sum: float, n: int, expected_std: float) -> None:
    """Raise :class:`PrivacyCheckError` unless ``noise_sq_sum`` fits ``n`` draws of ``N(0, std^2)``."""
    measured = math.sqrt(noise_sq_sum / n)
    low, high = noise_scale_interval(n)
    ratio = measured / expected_std
    if not low <= ratio <= high:
        raise PrivacyCheckError(
            f"dp_auto run-time check: the noise that entered the first step has std {measured:.4g} over "
            f"{n} coordinates, {ratio:.3g} times the expected sigma * R = {expected_std:.4g} (accepted "
            f"range {low:.3g}..{high:.3g} at false-alarm rate {FALSE_ALARM:g}). The accounted epsilon "
            "does not hold for this run: the noise is scaled wrongly, drawn on several ranks, or not "
            "added to what the optimizer receives."
        )


def check_batch_size_plausible(examples: int, dataset_size: int, sample_rate: float) -> None:
    """Raise unless ``examples`` is plausible as one draw of ``Binomial(dataset_size, sample_rate)``."""
    binom = stats.binom(dataset_size, sample_rate)
    p_value = 2 * min(binom.cdf(examples), binom.sf(examples - 1))
    if p_value < FALSE_ALARM:
        raise PrivacyCheckError(
            f"dp_auto run-time check: the first step used {examples} examples, but Poisson sampling with "
            f"q = {sample_rate:.6g} of N = {dataset_size} examples gives {dataset_size * sample_rate:.1f} "
            f"on average (two-sided p-value {p_value:.2g}). The sampler does not draw at the accounted "
            "rate q; the accounted epsilon does not hold."
        )


def check_rates_agree(
    strategy_q: float, sampler_q: float | None, accounted: list[tuple[float, float]], sigma: float
) -> None:
    """Raise unless the sampler's rate, the strategy's ``q`` and every accounted ``(sigma, q)`` agree."""
    if sampler_q is not None and not math.isclose(sampler_q, strategy_q, rel_tol=1e-9):
        raise PrivacyCheckError(
            f"dp_auto run-time check: the Poisson sampler draws at rate {sampler_q:.6g}, but the strategy "
            f"accounts q = {strategy_q:.6g}. Rebuild the training DataLoader through dp_auto (do not "
            "replace it after setup)."
        )
    for acc_sigma, acc_q in accounted:
        if not math.isclose(acc_q, strategy_q, rel_tol=1e-9) or not math.isclose(
            acc_sigma, sigma, rel_tol=1e-9
        ):
            raise PrivacyCheckError(
                f"dp_auto run-time check: the privacy accountant records (sigma={acc_sigma:.6g}, "
                f"q={acc_q:.6g}) for this run, but the strategy trains with (sigma={sigma:.6g}, "
                f"q={strategy_q:.6g}). The reported epsilon would not be the one spent."
            )


class FirstStepChecks:
    """The checks above, fed by a few calls from :class:`~lightning_autodp.DPAutoStrategy`.

    Call order at each optimizer step (all calls return at once after the first step passed):
    :meth:`before_noise` with the clipped sums, :meth:`after_privatize` once ``p.grad`` holds the
    private gradient (before ``optimizer.step``), :meth:`after_step` after it.
    """

    def __init__(self, strategy: DPAutoStrategy) -> None:
        self.strategy = strategy
        self.done = False
        self._clipped: list[Tensor] | None = None
        self._contributed: Tensor | None = None
        self._before: dict[nn.Parameter, tuple[float, float]] = {}
        self._scale_before: float | None = None
        self._reduced = False

    # ------------------------------------------------------------------ hooks

    def before_noise(
        self, summed: dict[nn.Parameter, Tensor], params: list[nn.Parameter], reduced: bool = False
    ) -> None:
        """Keep the clipped sums (before noise) and which parameters got a contribution.

        ``reduced``: the sums are already summed over ranks, each rank holding the shard of every
        parameter it owns (dp_fsdp); otherwise they are this rank's own, full-size sums.
        """
        if self.done:
            return
        self._check_all_trainable_handled(params)
        self._reduced = reduced
        self._clipped = [
            local_part(summed[p]).detach().clone()
            if p in summed
            else torch.zeros_like(local_part(p), dtype=torch.float64)
            for p in params
        ]
        device = local_part(params[0]).device
        self._contributed = torch.tensor([float(p in summed) for p in params], device=device)

    def after_privatize(self, params: list[nn.Parameter], divisor: float, examples: float) -> None:
        """Check the noise that entered and the sampling rate; fingerprint the parameters."""
        if self.done or self._clipped is None:
            return
        strategy = self.strategy
        if self._reduced:
            clipped, contributed = self._clipped, self._contributed
        else:
            clipped, contributed = self._reduce(self._clipped, self._contributed)
        sigma = float(strategy.noise_multiplier)  # type: ignore[arg-type]
        scaler = getattr(strategy.precision_plugin, "scaler", None)
        if sigma > 0:
            sq_sum, n = 0.0, 0
            for p, s in zip(params, clipped):
                noise = local_part(p.grad).detach().to(torch.float64) * divisor - s.to(torch.float64)
                sq_sum += float(noise.square().sum())
                n += noise.numel()
            if self._reduced:  # each rank saw the noise of its own shards: check the whole world's
                sq_sum, n = self._sum_over_ranks(sq_sum, n)
            if scaler is not None and not math.isfinite(sq_sum):
                self._clipped = None  # inf/NaN: the GradScaler skips this step; check the next one
                return
            check_noise_scale(sq_sum, n, sigma * strategy.max_grad_norm)
        else:
            self._warn_no_contribution(params, contributed)
        self._check_sampling(int(round(examples)))
        self._before = {p: _fingerprint(p) for p in params}
        self._scale_before = float(scaler.get_scale()) if scaler is not None else None
        self._clipped = None

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Every parameter with a non-zero gradient and ``lr > 0`` must have changed."""
        if self.done or not self._before:
            return
        scaler = getattr(self.strategy.precision_plugin, "scaler", None)
        if scaler is not None and self._scale_before is not None and scaler.get_scale() < self._scale_before:
            self._before = {}  # the GradScaler skipped this step: check the next one
            return
        names = self._names()
        for group in optimizer.param_groups:
            if float(group.get("lr", 1.0)) == 0.0:
                continue
            for p in group["params"]:
                if p not in self._before or p.grad is None or not bool(local_part(p.grad).any()):
                    continue
                if _fingerprint(p) == self._before[p]:
                    raise PrivacyCheckError(
                        f"dp_auto run-time check: parameter {names.get(p, '?')!r} received a private "
                        f"gradient and its optimizer group has lr={group['lr']}, but the first "
                        f"{type(optimizer).__name__}.step() did not change it. The update trains "
                        "something other than the model the privacy accounting is about."
                    )
        self._before = {}
        self.done = True

    # ------------------------------------------------------------------ the individual checks

    def _check_all_trainable_handled(self, params: list[nn.Parameter]) -> None:
        handled = set(params)
        names = self._names()
        for optimizer in self.strategy.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad and p not in handled:
                        raise PrivacyCheckError(
                            f"dp_auto run-time check: parameter {names.get(p, '?')!r} is trainable and in "
                            f"the optimizer, but dp_auto neither clips nor noises it (it was frozen when "
                            "training was set up, or is not part of the LightningModule): its raw "
                            "gradient would reach the optimizer. Set requires_grad before Trainer.fit, "
                            "and keep every trained parameter inside the LightningModule."
                        )

    def _check_sampling(self, examples: int) -> None:
        strategy = self.strategy
        if not strategy.poisson_sampling:
            return
        loader = strategy._poisson_loader
        sampler_q = getattr(getattr(loader, "batch_sampler", None), "sample_rate", None)
        # What the privacy ledger recorded for this step: every accountant (PrivacyBudget, the
        # end-of-fit summary) reads the ledger, so it must hold the rate the sampler drew at.
        last = strategy.ledger.last
        accounted = [] if last is None or last[1] is None else [(float(last[0]), float(last[1]))]
        check_rates_agree(strategy.sample_rate, sampler_q, accounted, float(strategy.noise_multiplier))
        assert strategy.dataset_size is not None
        check_batch_size_plausible(examples, strategy.dataset_size, strategy.sample_rate)

    def _warn_no_contribution(self, params: list[nn.Parameter], contributed: Tensor) -> None:
        names = self._names()
        missing = [names.get(p, "?") for p, c in zip(params, contributed.tolist()) if c == 0]
        if missing:
            warnings.warn(
                f"dp_auto: with noise_multiplier=0, the trainable parameters {missing} received no clipped "
                "contribution and no noise at the first step (no example's loss depends on them).",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ helpers

    def _reduce(self, clipped: list[Tensor], contributed: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """Sum the clipped sums and contribution flags over ranks (what the noisy all-reduce summed)."""
        assert contributed is not None
        if not (self.strategy.world_size > 1 and dist.is_available() and dist.is_initialized()):
            return clipped, contributed
        flat = torch.cat([s.reshape(-1).to(torch.float64) for s in clipped] + [contributed.to(torch.float64)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out, offset = [], 0
        for s in clipped:
            out.append(flat[offset : offset + s.numel()].view(s.shape))
            offset += s.numel()
        return out, flat[offset:]

    def _sum_over_ranks(self, sq_sum: float, n: int) -> tuple[float, int]:
        if not (self.strategy.world_size > 1 and dist.is_available() and dist.is_initialized()):
            return sq_sum, n
        device = self._contributed.device if self._contributed is not None else None
        both = torch.tensor([sq_sum, float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        return float(both[0]), int(both[1])

    def _names(self) -> dict[nn.Parameter, str]:
        module = self.strategy.lightning_module
        return {p: name for name, p in module.named_parameters()} if module is not None else {}


def _fingerprint(p: Tensor) -> tuple[float, float]:
    """Two float64 moments of a parameter: equal before and after a real update only by accident."""
    x = local_part(p).detach().to(torch.float64)
    return float(x.sum()), float(x.square().sum())
