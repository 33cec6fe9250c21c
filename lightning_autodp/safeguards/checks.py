r"""Run-time checks against silent privacy failures: the first step in full, then every ``k`` steps.

A DP bug does not stop training: the model still learns. :class:`RunTimeChecks` is a
:class:`~lightning_autodp.mechanism.observers.StepObserver` that the strategy registers by default
(``DPAutoStrategy(run_checks=False)`` turns it off). It looks at the very sums, gradients and
samples the update uses, and stops training with an error naming what is wrong when

1. **a trainable parameter escapes the mechanism** (first step of every fit): it is in an optimizer
   with ``requires_grad=True`` but dp_auto neither clips nor noises it (e.g. adapters unfrozen after
   the strategy was set up), or a handled parameter received neither a clipped contribution nor
   noise (only possible with ``sigma = 0``: a warning);
2. **the clipping exceeds its bound** (first step and every look): probe examples with norms from
   :math:`10^{-3}R` to :math:`10^3R` go through the step's own
   :meth:`~lightning_autodp.mechanism.step.DPStep.clip_weights`; each weighted norm must be at
   most :math:`R` (the sensitivity the noise is calibrated for);
3. **the noise that entered has the wrong scale**: with :math:`s` the clipped sums (all ranks)
   before noise and :math:`\tilde s = b\,\tilde g` the sums the optimizer receives, the noise is
   :math:`\xi = \tilde s - s`. Under the claim :math:`\xi \sim N(0, \sigma^2R^2 I)`,
   :math:`S = \|\xi\|^2/(\sigma R)^2 \sim \chi^2_n` over :math:`n` coordinates. The first step tests
   every coordinate; every ``check_every`` steps after it (a *look*) a random subset of at most
   ``check_coordinates`` coordinates is tested, on its own and pooled with all earlier looks of
   the fit (evidence accumulates: the pooled :math:`S` is :math:`\chi^2` with the pooled :math:`n`).
   The relative error of the measured std is about :math:`1/\sqrt{2n}`: 4096 coordinates per look
   detect a noise std off by about 10% at the first look, and less as looks pool;
4. **the parameters did not change** after the first step although they received a non-zero
   gradient and their group has ``lr > 0``. A step skipped by the GradScaler (inf/NaN) moves the
   first-step checks to the next step and skips a look;
5. **the sampling rate is not the accounted one**: the Poisson sampler's ``sample_rate``, the
   strategy's ``q`` and the ledger's must agree (first step); the first step's number of examples
   must be plausible under :math:`\mathrm{Binomial}(N, q)`; and at every look the examples of all
   :math:`t` steps so far, :math:`K_t`, must be plausible under :math:`\mathrm{Binomial}(tN, q)`
   (a sequential test: a sampler at :math:`1.25q` with :math:`qN = 128` is caught at the first look).

False alarms. Each test family has a false-alarm probability of at most :data:`FALSE_ALARM`
(:math:`10^{-6}`) over a whole fit: the single first-step tests use it directly; the sequential
tests (noise per look, noise pooled, sample sizes) spend :math:`\alpha_j = 6\alpha/(\pi^2 j^2)` at
their :math:`j`-th look, and :math:`\sum_j \alpha_j = \alpha`. With five families a correct fit is
stopped by mistake with probability at most :math:`5 \cdot 10^{-6}`, however long it runs.

Cost: at the first step one copy of the clipped sums (and an all-reduce of them under DDP); at a
look, a gather of ``check_coordinates`` coordinates before and after the noise (an all-reduce of
them under DDP), a clipping probe of 7 numbers and one binomial tail; nothing at other steps but
two integer additions. ``benchmarks/checks_cost.py`` measures it.
"""

from __future__ import annotations

import math
import warnings

import torch
from scipy import special, stats
from torch import Tensor, nn

from lightning_autodp.mechanism.observers import StepContext, StepObserver, VirtualExamples
from lightning_autodp.mechanism.sharded import local_part
from lightning_autodp.mechanism.step import DPStep

#: false-alarm probability of each test family over a whole fit
FALSE_ALARM = 1e-6
#: steps between two looks of the sequential checks
DEFAULT_CHECK_EVERY = 25
#: coordinates of the noise tested at each look
DEFAULT_CHECK_COORDINATES = 4096
#: probe norms of the clipping check, in units of R
_PROBE_NORMS = (1e-3, 0.1, 0.5, 1.0, 2.0, 10.0, 1e3)


class PrivacyCheckError(RuntimeError):
    """A run-time check found the DP mechanism not doing what is accounted."""


def look_level(look: int, false_alarm: float = FALSE_ALARM) -> float:
    r"""The false-alarm level spent at look ``look`` (1, 2, ...): :math:`6\alpha/(\pi^2 j^2)`, summing to
    :math:`\alpha` over all looks."""
    if look < 1:
        raise ValueError(f"looks are counted from 1, got {look}")
    return 6.0 * false_alarm / (math.pi**2 * look**2)


def noise_scale_interval(n: int, false_alarm: float = FALSE_ALARM) -> tuple[float, float]:
    r"""The accepted range of the measured ratio :math:`\hat s / (\sigma R)` for ``n`` coordinates.

    :math:`\hat s^2 = \|\xi\|^2 / n` and :math:`n \hat s^2/(\sigma R)^2 \sim \chi^2_n`: the bounds are
    :math:`\sqrt{\chi^2_{n}(\alpha/2)/n}` and :math:`\sqrt{\chi^2_{n}(1-\alpha/2)/n}`.
    """
    low = stats.chi2.ppf(false_alarm / 2, n) / n
    high = stats.chi2.isf(false_alarm / 2, n) / n
    return math.sqrt(low), math.sqrt(high)


def check_noise_scale(
    noise_sq_sum: float,
    n: int,
    expected_std: float,
    false_alarm: float = FALSE_ALARM,
    where: str = "the first step",
) -> None:
    r"""Raise :class:`PrivacyCheckError` unless ``noise_sq_sum`` fits ``n`` draws of ``N(0, std^2)``.

    The two-sided p-value :math:`2\min(F(S), 1 - F(S))` of :math:`S = \|\xi\|^2/\mathrm{std}^2` under
    :math:`\chi^2_n` (``scipy.special.chdtr``, microseconds) must reach ``false_alarm``: the same
    decision as :func:`noise_scale_interval`, whose quantiles are computed only for the message.
    """
    statistic = noise_sq_sum / expected_std**2
    p_value = 2 * min(float(special.chdtr(n, statistic)), float(special.chdtrc(n, statistic)))
    if p_value < false_alarm:
        measured = math.sqrt(noise_sq_sum / n)
        low, high = noise_scale_interval(n, false_alarm)
        ratio = measured / expected_std
        raise PrivacyCheckError(
            f"dp_auto run-time check: the noise that entered {where} has std {measured:.4g} over "
            f"{n} coordinates, {ratio:.3g} times the expected sigma * R = {expected_std:.4g} (accepted "
            f"range {low:.3g}..{high:.3g} at false-alarm rate {false_alarm:.2g}). The accounted epsilon "
            "does not hold for this run: the noise is scaled wrongly, drawn on several ranks, or not "
            "added to what the optimizer receives."
        )


def binomial_p_value(successes: int, trials: int, rate: float) -> float:
    """Two-sided p-value of ``successes`` as one draw of ``Binomial(trials, rate)``."""
    binom = stats.binom(trials, rate)
    return float(min(1.0, 2 * min(binom.cdf(successes), binom.sf(successes - 1))))


def chernoff_p_value(successes: int, trials: int, rate: float) -> float:
    r"""A two-sided p-value bound for ``successes`` of ``Binomial(trials, rate)``, in microseconds.

    Chernoff: :math:`P[K \ge k] \le e^{-n\,\mathrm{KL}(k/n \,\|\, q)}` for :math:`k \ge nq` (and the
    mirror image below), with :math:`\mathrm{KL}(a\|q) = a\log\frac{a}{q} + (1-a)\log\frac{1-a}{1-q}`.
    Twice the bound is at least the exact two-sided p-value, so a test that rejects when it falls
    below a level keeps that level (it gives up a little power for a cost of a few arithmetic
    operations, where scipy's exact tail takes milliseconds at large ``trials``).
    """
    if not 0 < rate < 1 or trials <= 0:
        return 1.0
    a = successes / trials
    kl = 0.0
    if a > 0:
        kl += a * math.log(a / rate)
    if a < 1:
        kl += (1 - a) * math.log((1 - a) / (1 - rate))
    return min(1.0, 2 * math.exp(-trials * kl))


def check_batch_size_plausible(examples: int, dataset_size: int, sample_rate: float) -> None:
    """Raise unless ``examples`` is plausible as one draw of ``Binomial(dataset_size, sample_rate)``."""
    p_value = binomial_p_value(examples, dataset_size, sample_rate)
    if p_value < FALSE_ALARM:
        raise PrivacyCheckError(
            f"dp_auto run-time check: the first step used {examples} examples, but Poisson sampling with "
            f"q = {sample_rate:.6g} of N = {dataset_size} examples gives {dataset_size * sample_rate:.1f} "
            f"on average (two-sided p-value {p_value:.2g}). The sampler does not draw at the accounted "
            "rate q; the accounted epsilon does not hold."
        )


def check_sample_sizes(
    examples: int, steps: int, dataset_size: int, sample_rate: float, false_alarm: float
) -> None:
    r"""Raise unless ``examples`` over ``steps`` Poisson steps fits :math:`\mathrm{Binomial}(tN, q)`."""
    trials = steps * dataset_size
    p_value = chernoff_p_value(examples, trials, sample_rate)
    if p_value < false_alarm:
        raise PrivacyCheckError(
            f"dp_auto run-time check: the {steps} steps so far drew {examples} examples, a rate of "
            f"{examples / trials:.4g} per example and step, but the accounted q = {sample_rate:.6g} gives "
            f"{trials * sample_rate:.1f} on average (two-sided p-value at most {p_value:.2g}, below this "
            f"look's false-alarm level {false_alarm:.2g}). The sampler does not draw at the accounted rate "
            "q; "
            "the accounted epsilon does not hold."
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


def check_clipping_bound(dp_step: DPStep, max_grad_norm: float) -> None:
    r"""Probe the step's own clipping with virtual examples: :math:`\|C_j g_j\| \le R` for every norm.

    Dirac examples with norms :data:`_PROBE_NORMS` :math:`\times R` go through
    :meth:`DPStep.clip_weights` (the weights the real examples get); their weighted norms
    :math:`C_j \|g_j\|` must not exceed :math:`R` (up to float32 round-off).
    """
    norms = torch.tensor(_PROBE_NORMS, dtype=torch.float64) * max_grad_norm
    zeros = torch.zeros(len(norms), dtype=torch.long)
    probe = VirtualExamples(dp_step.params[:1]).load(zeros, zeros, norms)
    weights = dp_step.clip_weights(probe, 1.0)
    contributions = weights.double().cpu() * norms
    worst = int(contributions.argmax())
    if float(contributions[worst]) > max_grad_norm * (1 + 1e-5):
        raise PrivacyCheckError(
            f"dp_auto run-time check: an example with gradient norm {float(norms[worst]):.4g} enters the "
            f"clipped sum with norm {float(contributions[worst]):.4g}, above the clipping bound "
            f"R = {max_grad_norm:.4g} that the noise is calibrated for. The clipping "
            f"(DPStep.clip_weights, clipping={dp_step.clipping!r}) does not bound each example's "
            "contribution; the accounted epsilon does not hold."
        )


class RunTimeChecks(StepObserver):
    """The checks above, as a :class:`~lightning_autodp.mechanism.observers.StepObserver`.

    Args:
        check_every: steps between two looks of the sequential checks (noise subset, sample sizes);
            25 by default.
        check_coordinates: noise coordinates tested at each look.
        seed: seeds the choice of coordinates at each look.
    """

    def __init__(
        self,
        check_every: int = DEFAULT_CHECK_EVERY,
        check_coordinates: int = DEFAULT_CHECK_COORDINATES,
        seed: int = 0,
    ) -> None:
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"check_every must be an int >= 1 (steps between looks), got {check_every!r}.")
        if not (isinstance(check_coordinates, int) and check_coordinates >= 1):
            raise ValueError(f"check_coordinates must be an int >= 1, got {check_coordinates!r}.")
        self.check_every = check_every
        self.check_coordinates = check_coordinates
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget everything of the previous fit."""
        #: True once the first step of the fit passed every first-step check
        self.done = False
        #: looks taken of the noise and of the sample sizes in this fit
        self.noise_looks = 0
        self.sample_looks = 0
        self._pooled_sq, self._pooled_n = 0.0, 0
        self._sampling_key: tuple[float, int] | None = None
        self._examples, self._steps = 0, 0
        self._pending: tuple[list[Tensor | None] | None, list[Tensor], Tensor] | None = None
        self._before: dict[nn.Parameter, tuple[float, float]] = {}
        self._scale_before: float | None = None

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, ctx: StepContext) -> None:
        self.reset()

    def _is_look(self, ctx: StepContext) -> bool:
        return ctx.fit_step > 0 and ctx.fit_step % self.check_every == 0

    def before_noise(self, ctx: StepContext) -> None:
        """Keep the clipped sums (all of them at the first step, a subset at a look); probe the clipping."""
        if not self.done:
            self._check_all_trainable_handled(ctx)
            check_clipping_bound(ctx.dp_step, ctx.max_grad_norm)
            self._pending = self._capture(ctx, None)
        elif self._is_look(ctx):
            check_clipping_bound(ctx.dp_step, ctx.max_grad_norm)
            self._pending = self._capture(ctx, self._coordinates(ctx))

    def on_batch_sampled(self, ctx: StepContext, examples: int) -> None:
        """The first step's rates and batch size; at looks, all steps' sample sizes so far."""
        if ctx.sampler is None or ctx.sample_rate is None or not ctx.dataset_size:
            return
        q, n = float(ctx.sample_rate), int(ctx.dataset_size)
        if not self.done:
            last = ctx.ledger.last if ctx.ledger is not None else None
            accounted = [] if last is None or last[1] is None else [(float(last[0]), float(last[1]))]
            check_rates_agree(q, float(ctx.sampler.sample_rate), accounted, float(ctx.sigma))
            check_batch_size_plausible(examples, n, q)
        if self._sampling_key != (q, n):  # a reloaded loader: a new sequence of draws
            self._sampling_key, self._examples, self._steps, self.sample_looks = (q, n), 0, 0, 0
        self._examples += examples
        self._steps += 1
        if self._is_look(ctx) and q < 1.0:
            self.sample_looks += 1
            check_sample_sizes(self._examples, self._steps, n, q, look_level(self.sample_looks))

    def after_privatize(self, ctx: StepContext, divisor: float, examples: float) -> None:
        """Test the noise that entered; fingerprint the parameters at the first step."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        coords, clipped, contributed = pending
        first = coords is None
        if ctx.sigma > 0:
            sq_sum, n = self._noise_statistic(ctx, coords, clipped, divisor)
            if ctx.grad_scaler is not None and not math.isfinite(sq_sum):
                return  # inf/NaN: the GradScaler skips this step; check the next one
            expected = ctx.sigma * ctx.max_grad_norm
            if first:
                check_noise_scale(sq_sum, n, expected)
            else:
                self.noise_looks += 1
                level = look_level(self.noise_looks)
                where = f"step {ctx.fit_step + 1} of this fit"
                check_noise_scale(sq_sum, n, expected, level, where)
                self._pooled_sq, self._pooled_n = self._pooled_sq + sq_sum, self._pooled_n + n
                where = f"the {self.noise_looks} looks up to step {ctx.fit_step + 1} (pooled)"
                check_noise_scale(self._pooled_sq, self._pooled_n, expected, level, where)
        elif first:
            self._warn_no_contribution(ctx, contributed)
        if first:
            self._before = {p: _fingerprint(p) for p in ctx.params}
            self._scale_before = float(ctx.grad_scaler.get_scale()) if ctx.grad_scaler is not None else None

    def after_step(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> None:
        """Every parameter with a non-zero gradient and ``lr > 0`` must have changed (first step)."""
        if self.done or not self._before:
            return
        scaler = ctx.grad_scaler
        if scaler is not None and self._scale_before is not None and scaler.get_scale() < self._scale_before:
            self._before = {}  # the GradScaler skipped this step: check the next one
            return
        for group in optimizer.param_groups:
            if float(group.get("lr", 1.0)) == 0.0:
                continue
            for p in group["params"]:
                if p not in self._before or p.grad is None or not bool(local_part(p.grad).any()):
                    continue
                if _fingerprint(p) == self._before[p]:
                    raise PrivacyCheckError(
                        f"dp_auto run-time check: parameter {ctx.names.get(p, '?')!r} received a private "
                        f"gradient and its optimizer group has lr={group['lr']}, but the first "
                        f"{type(optimizer).__name__}.step() did not change it. The update trains "
                        "something other than the model the privacy accounting is about."
                    )
        self._before = {}
        self.done = True

    # ------------------------------------------------------------------ the individual checks

    def _check_all_trainable_handled(self, ctx: StepContext) -> None:
        handled = set(ctx.params)
        for optimizer in ctx.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad and p not in handled:
                        raise PrivacyCheckError(
                            f"dp_auto run-time check: parameter {ctx.names.get(p, '?')!r} is trainable and "
                            "in the optimizer, but dp_auto neither clips nor noises it (it was frozen when "
                            "training was set up, or is not part of the LightningModule): its raw "
                            "gradient would reach the optimizer. Set requires_grad before Trainer.fit, "
                            "and keep every trained parameter inside the LightningModule."
                        )

    def _warn_no_contribution(self, ctx: StepContext, contributed: Tensor) -> None:
        missing = [ctx.names.get(p, "?") for p, c in zip(ctx.params, contributed.tolist()) if c == 0]
        if missing:
            warnings.warn(
                f"dp_auto: with noise_multiplier=0, the trainable parameters {missing} received no clipped "
                "contribution and no noise at the first step (no example's loss depends on them).",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ helpers

    def _coordinates(self, ctx: StepContext) -> list[Tensor | None]:
        """About ``check_coordinates`` distinct coordinates of this rank's (local) parameters, as flat
        offsets per parameter: every ``stride``-th from a random start, the same on every rank of data
        parallelism (seeded by step). Under the claim the noise's coordinates are i.i.d., so any set
        chosen without looking at the noise gives an exact test; the random start varies it."""
        sizes = [local_part(p).numel() for p in ctx.params]
        total = sum(sizes)
        stride = max(total // self.check_coordinates, 1)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + ctx.step) % 2**63)
        start = int(torch.randint(stride, (1,), generator=generator))
        flat = torch.arange(start, total, stride)
        ends = torch.tensor(sizes).cumsum(0)
        cuts = torch.searchsorted(flat, ends).tolist()
        out: list[Tensor | None] = []
        begin, start = 0, 0
        for size, cut in zip(sizes, cuts):
            out.append(flat[begin:cut] - start if cut > begin else None)
            begin, start = cut, start + size
        return out

    def _capture(
        self, ctx: StepContext, coords: list[Tensor | None] | None
    ) -> tuple[list[Tensor | None] | None, list[Tensor], Tensor]:
        """The clipped sums before noise (all, or at ``coords``), summed over ranks, as float64."""
        summed = ctx.dp_step.summed
        parts: list[Tensor] = []
        for i, p in enumerate(ctx.params):
            local = local_part(summed[p]) if p in summed else None
            if coords is None:
                value = local if local is not None else torch.zeros_like(local_part(p))
            elif coords[i] is None:
                continue
            else:
                sel = coords[i].to(local_part(p).device)
                value = (
                    local.reshape(-1)[sel] if local is not None else torch.zeros(len(sel), device=sel.device)
                )
            parts.append(value.detach().to(torch.float64).clone())
        device = local_part(ctx.params[0]).device
        contributed = torch.tensor(
            [float(p in summed) for p in ctx.params], device=device, dtype=torch.float64
        )
        if not ctx.dp_step.sums_are_reduced and ctx.world_size > 1 and ctx.reduce is not None:
            flat = torch.cat([s.reshape(-1) for s in parts] + [contributed])
            ctx.reduce(flat)
            offset, reduced = 0, []
            for s in parts:
                reduced.append(flat[offset : offset + s.numel()].view(s.shape))
                offset += s.numel()
            parts, contributed = reduced, flat[offset:]
        return coords, parts, contributed

    def _noise_statistic(
        self, ctx: StepContext, coords: list[Tensor | None] | None, clipped: list[Tensor], divisor: float
    ) -> tuple[float, int]:
        """``(||xi||^2, n)`` of the noise that entered, over the captured coordinates of all ranks."""
        sq_sum, n = 0.0, 0
        parts = iter(clipped)
        for i, p in enumerate(ctx.params):
            if coords is not None and coords[i] is None:
                continue
            s = next(parts)
            grad = local_part(p.grad).detach()
            if coords is not None:
                grad = grad.reshape(-1)[coords[i].to(grad.device)]
            noise = grad.to(torch.float64) * divisor - s
            sq_sum += float(noise.square().sum())
            n += noise.numel()
        if ctx.dp_step.sums_are_reduced and ctx.world_size > 1 and ctx.reduce is not None:
            both = torch.tensor(
                [sq_sum, float(n)], dtype=torch.float64, device=local_part(ctx.params[0]).device
            )
            ctx.reduce(both)  # each rank saw the noise of its own shards: test the whole world's
            sq_sum, n = float(both[0]), int(both[1])
        return sq_sum, n


#: the name the first-step-only checks had; the checks now also run every ``check_every`` steps
FirstStepChecks = RunTimeChecks


def _fingerprint(p: Tensor) -> tuple[float, float]:
    """Two float64 moments of a parameter: equal before and after a real update only by accident."""
    x = local_part(p).detach().to(torch.float64)
    return float(x.sum()), float(x.square().sum())
