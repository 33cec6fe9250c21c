r"""White-box gradient canaries and the :class:`PrivacyAudit` callback.

Each canary :math:`j` is a virtual training example whose gradient is a Dirac
:math:`g_j = \pm N e_{c_j}` on one coordinate :math:`c_j` of the trainable parameters (distinct
coordinates, random signs), with :math:`N` = ``norm_multiple`` times the clipping bound :math:`R`.
Each canary is included in the run with probability 1/2 (the auditor's secret). An included canary
is then Poisson-sampled like a real example, by the data's own sampler (its rate and its
``inclusion_mask``), at every optimizer step; when sampled, its gradient goes through the step's own
clipping (:meth:`~lightning_autodp.mechanism.step.DPStep.add_virtual_examples`, the
``clip_and_accumulate`` of the data) and into the clipped sum before the noise (and, under DDP, before
the all-reduce: rank 0 holds the canaries as one more example of its shard). At the end the number
of canary draws that came in is tested against the accounted :math:`q`: a sampler that does not draw
at its rate is flagged even where the epsilon bound has no power.

Score: :math:`s_j = \mp (\theta_T - \theta_0)_{c_j}`, the total move of the canary's coordinate in
the direction its gradient pushes (SGD steps against the gradient). Under DDP the final
coordinates are averaged over the ranks, so a run whose ranks diverge (each with its own noise) is
audited as the release of all its copies. For an included canary and plain SGD with learning rate
:math:`\eta`, :math:`E[s_j] \approx \eta\, q T R / B` against noise of std
:math:`\eta\sigma R\sqrt{T}/B` and the drift of the real examples on that coordinate.

What this audits: Poisson sampling of examples, clipping (the factor the strategy applies), the
noise and its scale, the all-reduce and the division by :math:`B`, and the optimizer's use of the
private gradient. What it does not: the per-example gradients of the real examples (the engines),
because a canary's gradient is written directly into the sum. See ``docs/concepts/auditing.md``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_autodp.mechanism import distributed
from lightning_autodp.mechanism.observers import StepContext, StepObserver, VirtualExamples
from lightning_autodp.safeguards.audit.bound import SAMPLING_FALSE_ALARM, AuditResult, audit_scores
from lightning_autodp.safeguards.checks import binomial_p_value


class GradientCanaries(StepObserver):
    """``m`` Dirac gradient canaries on coordinates of ``params``, a step observer of the strategy.

    Args:
        m: number of canaries (at most the number of trainable coordinates).
        params: the trainable parameters, in the strategy's order.
        sample_rate: :math:`q`, the Poisson rate of the real examples (used only when the strategy
            has no Poisson sampler; otherwise the sampler's own rate and draw are used).
        norm: :math:`N`, the norm of each canary's gradient before clipping.
        seed: seeds the choice of coordinates, signs, inclusion and per-step sampling.

    At every step, on rank 0: the canaries are drawn by the data's Poisson sampler
    (:meth:`~lightning_autodp.DistributedPoissonBatchSampler.inclusion_mask`, with the canaries'
    own generator), and the drawn included ones are clipped and added to the sum by the step's own
    :meth:`~lightning_autodp.mechanism.step.DPStep.add_virtual_examples`: the code that samples and
    clips the data samples and clips the canaries.
    """

    supports_sharded = False

    def __init__(
        self, m: int, params: list[nn.Parameter], sample_rate: float, norm: float, seed: int
    ) -> None:
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        if not 1 <= m <= total:
            raise ValueError(
                f"PrivacyAudit(m={m}) needs 1 <= m <= the number of trainable coordinates ({total}): each "
                "canary owns one coordinate. Lower m."
            )
        self.m, self.sample_rate, self.norm = m, sample_rate, norm
        self.params = list(params)
        self._generator = torch.Generator().manual_seed(seed)
        flat = torch.randperm(total, generator=self._generator)[:m]
        starts = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()])
        #: which parameter (index into params) and which element of it each canary owns
        self.param_index = torch.searchsorted(starts, flat, right=True) - 1
        self.offset = flat - starts[self.param_index]
        self.sign = torch.randint(0, 2, (m,), generator=self._generator).double() * 2 - 1
        self.included = torch.rand(m, generator=self._generator) < 0.5
        self.sampled_count = torch.zeros(m, dtype=torch.long)
        #: per accounted rate q: [draws of included canaries, how many were drawn in]
        self.draws: dict[float, list[int]] = {}
        self.initial = self._coordinates()
        self._virtual = VirtualExamples(self.params)

    def _coordinates(self) -> Tensor:
        """The canaries' coordinates of the current parameters, float64 on the CPU."""
        out = torch.empty(self.m, dtype=torch.float64)
        for i, p in enumerate(self.params):
            mask = self.param_index == i
            if mask.any():
                out[mask] = p.detach().reshape(-1)[self.offset[mask].to(p.device)].double().cpu()
        return out

    def _draw(self, ctx: StepContext) -> Tensor:
        """Which canaries the data's sampler lets into this step (drawn for all ``m``)."""
        if ctx.sampler is not None:
            return ctx.sampler.inclusion_mask(self._generator, self.m)
        rate = ctx.sample_rate if ctx.sample_rate is not None else self.sample_rate
        return torch.rand(self.m, generator=self._generator) < rate

    def contribute(self, ctx: StepContext) -> None:
        r"""Add :math:`\sum_j C_j g_j` of this step's drawn canaries to the step's sum (rank 0 only).

        Called once per optimizer step, after the real examples' clipped sum is complete and
        before the noise.
        """
        if ctx.rank != 0:
            return
        if [id(p) for p in ctx.params] != [id(p) for p in self.params]:
            raise RuntimeError(
                "PrivacyAudit: the strategy's trainable parameters changed since the audit started."
            )
        sampled = self.included & self._draw(ctx)
        rate = float(ctx.sample_rate if ctx.sample_rate is not None else self.sample_rate)
        counts = self.draws.setdefault(rate, [0, 0])
        counts[0] += int(self.included.sum())
        counts[1] += int(sampled.sum())
        if not sampled.any():
            return
        self.sampled_count += sampled.long()
        idx = sampled.nonzero().squeeze(1)
        values = self.norm * self.sign[idx]  # g_j = value_j e_{c_j}
        ctx.dp_step.add_virtual_examples(self._virtual.load(self.param_index[idx], self.offset[idx], values))

    def sampling_p_value(self) -> tuple[float | None, float | None, float | None]:
        r"""``(p, realised, accounted)``: how plausible the canaries' draws are at the accounted rate.

        Each included canary was drawn at every step by the data's sampler; under the accounted
        rate :math:`q` the number drawn in is :math:`\mathrm{Binomial}(\text{draws}, q)`. ``p`` is the
        two-sided p-value (Bonferroni over the rates of the run), ``realised`` the drawn share and
        ``accounted`` the draw-weighted accounted rate; all None before any draw. Rank 0's numbers.
        """
        used = {q: c for q, c in self.draws.items() if c[0] > 0}
        if not used:
            return None, None, None
        p = min(binomial_p_value(drawn, trials, q) for q, (trials, drawn) in used.items()) * len(used)
        trials = sum(c[0] for c in used.values())
        realised = sum(c[1] for c in used.values()) / trials
        accounted = sum(q * c[0] for q, c in used.items()) / trials
        return min(p, 1.0), realised, accounted

    def scores(self) -> np.ndarray:
        r"""``s_j = -sign_j (theta_T - theta_0)[c_j]``, the final coordinates averaged over ranks."""
        final = self._coordinates()
        if distributed.is_distributed():
            final_dev = final.to(self.params[0].device)
            distributed.all_reduce_sum(final_dev)
            final = final_dev.cpu() / distributed.world_size()
        return (-(self.sign) * (final - self.initial)).numpy()


class PrivacyAudit(Callback):
    """Audit a ``strategy="dp_auto"`` run with ``m`` gradient canaries: an empirical lower bound on epsilon.

    At the end of ``fit`` the callback scores its canaries, turns the guesses into an epsilon lower
    bound at ``delta`` (Steinke, Nasr, Jagielski 2023; see :mod:`lightning_autodp.safeguards.audit.bound`),
    logs ``audit_epsilon_lower_bound`` to every logger, prints it beside the accounted epsilon and
    keeps it in :attr:`result`. A bound above the accounted epsilon means the run is not as private
    as claimed (with probability at least ``confidence``); a warning says so.

    Args:
        m: number of canaries. More canaries: a higher ceiling (:attr:`AuditResult.max_certifiable`),
            and more coordinates of the model carry canary gradients.
        confidence: e.g. 0.95.
        delta: the delta of the bound; by default that of the
            :class:`~lightning_autodp.PrivacyBudget` callback.
        norm_multiple: each canary's gradient norm before clipping, in units of ``max_grad_norm``
            (well above 1, so that a clipping that does not act shows).
        seed: seeds the canaries (coordinates, signs, inclusion, sampling); ``None``: a fresh random
            seed (the auditor's secret).

    Example::

        audit = PrivacyAudit(m=1000)
        trainer = L.Trainer(strategy="dp_auto", callbacks=[PrivacyBudget(target_epsilon=8.0), audit])
        trainer.fit(model, datamodule)
        audit.result.epsilon_lower_bound  # compare with the accounted epsilon

    Use SGD (with or without momentum) for the audited run: the score assumes the coordinate moves
    by a fixed multiple of its gradient. Under Adam-type optimizers each coordinate's step is
    divided by its own running gradient scale, which shrinks the canary's push relative to the
    noise: the bound stays valid (any score gives a valid bound) but is weaker.
    """

    def __init__(
        self,
        m: int = 1000,
        confidence: float = 0.95,
        delta: float | None = None,
        norm_multiple: float = 100.0,
        seed: int | None = None,
    ) -> None:
        if m < 1:
            raise ValueError(f"PrivacyAudit(m={m}): at least one canary is needed; e.g. m=1000.")
        if not 0 < confidence < 1:
            raise ValueError(f"PrivacyAudit(confidence={confidence}) must be in (0, 1), e.g. 0.95.")
        if delta is not None and not 0 <= delta < 1:
            raise ValueError(f"PrivacyAudit(delta={delta}) must be in [0, 1), e.g. 1e-5.")
        if not norm_multiple > 0:
            raise ValueError(f"PrivacyAudit(norm_multiple={norm_multiple}) must be > 0, e.g. 100.")
        self.m, self.confidence, self.delta = m, confidence, delta
        self.norm_multiple = norm_multiple
        self.seed = seed
        self.canaries: GradientCanaries | None = None
        self.result: AuditResult | None = None
        self.accounted_epsilon: float | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_autodp.integration.strategy import require_dp_auto

        require_dp_auto(trainer, "PrivacyAudit audits")
        if self.delta is None and _find_budget(trainer) is None:
            raise ValueError(
                "PrivacyAudit needs a delta: pass PrivacyAudit(delta=...) or add "
                "lightning_autodp.PrivacyBudget(target_epsilon=..., delta=...) to the callbacks."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if strategy.steps > 0 or trainer.fit_loop.restarting:
            rank_zero_warn(
                "PrivacyAudit: this fit resumes a run; the canaries audit only the steps from here on, "
                "and the accounted epsilon compared is that of the whole run. Audit runs from the start."
            )
        if not isinstance(pl_module.optimizers(use_pl_optimizer=False), torch.optim.SGD):
            rank_zero_warn(
                "PrivacyAudit: the audited run does not use torch.optim.SGD; the canary score assumes SGD "
                "steps, so the bound stays valid but is weaker. Audit with SGD for the strongest test."
            )
        params = [p for p in pl_module.parameters() if p.requires_grad]
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        seed = strategy.broadcast(seed)  # every rank must know the same canary coordinates
        self.canaries = GradientCanaries(
            self.m,
            params,
            strategy.sample_rate,
            self.norm_multiple * strategy.max_grad_norm,
            _audit_seed(seed),
        )
        strategy.add_observer(self.canaries)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.canaries is None:
            return
        trainer.strategy.remove_observer(self.canaries)
        budget = _find_budget(trainer)
        delta = self.delta if self.delta is not None else float(budget.delta)  # type: ignore[union-attr]
        scores = self.canaries.scores()  # a collective under DDP: every rank calls it
        result = audit_scores(scores, self.canaries.included.numpy(), delta, self.confidence)
        p, realised, accounted = self.canaries.sampling_p_value()
        self.result = replace(result, sampling_p_value=p, sampled_rate=realised, accounted_rate=accounted)
        self.accounted_epsilon = float(budget.epsilon) if budget is not None else None
        for logger in trainer.loggers:
            logger.log_metrics(
                {"audit_epsilon_lower_bound": self.result.epsilon_lower_bound}, trainer.global_step
            )
        rank_zero_info(self.result.summary(self.accounted_epsilon))
        if self.accounted_epsilon is not None and self.result.epsilon_lower_bound > self.accounted_epsilon:
            rank_zero_warn(
                f"PrivacyAudit: the empirical lower bound {self.result.epsilon_lower_bound:.3f} exceeds the "
                f"accounted epsilon {self.accounted_epsilon:.3f} (at {self.confidence:.0%} confidence): this "
                "run is not as private as reported. Check the clipping, the noise and the sampling."
            )
        if self.result.sampling_violated:
            rank_zero_warn(
                f"PrivacyAudit: the data's Poisson sampler drew the canaries at rate "
                f"{self.result.sampled_rate:.4g}, not at the accounted q = {self.result.accounted_rate:.4g} "
                f"(two-sided p-value {self.result.sampling_p_value:.2g} < {SAMPLING_FALSE_ALARM:g}): the "
                "accounted epsilon does not hold for this sampling. Check the sampler."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.canaries is not None and hasattr(trainer.strategy, "remove_observer"):
            trainer.strategy.remove_observer(self.canaries)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.result is None:
            return {}
        return {"result": self.result.__dict__, "accounted_epsilon": self.accounted_epsilon}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "result" in state_dict:
            self.result = AuditResult(**state_dict["result"])
            self.accounted_epsilon = state_dict.get("accounted_epsilon")


def audit_lower_bound(trainer: pl.Trainer) -> float | None:
    """The epsilon lower bound of a :class:`PrivacyAudit` attached to ``trainer`` that has finished."""
    for cb in trainer.callbacks:
        if isinstance(cb, PrivacyAudit) and cb.result is not None:
            return cb.result.epsilon_lower_bound
    return None


def _find_budget(trainer: pl.Trainer) -> Any | None:
    from lightning_autodp.integration.summary import find_budget

    return find_budget(trainer)


def _audit_seed(seed: int) -> int:
    """A seed for the canaries' generator that does not replay the noise or sampling streams."""
    digest = hashlib.sha256(f"lightning_autodp.safeguards.audit:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
