r"""White-box gradient canaries and the :class:`PrivacyAudit` callback.

Each canary :math:`j` is a virtual training example whose gradient is a Dirac
:math:`g_j = \pm N e_{c_j}` on one coordinate :math:`c_j` of the trainable parameters (distinct
coordinates, random signs), with :math:`N` = ``norm_multiple`` times the clipping bound :math:`R`.
Each canary is included in the run with probability 1/2 (the auditor's secret). An included canary
is then Poisson-sampled like a real example, with the strategy's rate :math:`q`, at every
optimizer step; when sampled, its gradient goes through the strategy's own clipping
(:meth:`~lightning_autodp.DPAutoStrategy.clip_factors`) and into the clipped sum before the noise
(and, under DDP, before the all-reduce: rank 0 holds the canaries as one more example of its shard).

Score: :math:`s_j = \mp (\theta_T - \theta_0)_{c_j}`, the total move of the canary's coordinate in
the direction its gradient pushes (SGD steps against the gradient). Under DDP the final
coordinates are averaged over the ranks, so a run whose ranks diverge (each with its own noise) is
audited as the release of all its copies. For an included canary and plain SGD with learning rate
:math:`\eta`, :math:`E[s_j] \approx \eta\, q T R / B` against noise of std
:math:`\eta\sigma R\sqrt{T}/B` and the drift of the real examples on that coordinate.

What this audits: Poisson sampling of examples, clipping (the factor the strategy applies), the
noise and its scale, the all-reduce and the division by :math:`B`, and the optimizer's use of the
private gradient. What it does not: the per-example gradients of the real examples (the engines),
because a canary's gradient is written directly into the sum. See ``docs/auditing.md``.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_autodp.safeguards.audit.bound import AuditResult, audit_scores


class GradientCanaries:
    """``m`` Dirac gradient canaries on coordinates of ``params``.

    Args:
        m: number of canaries (at most the number of trainable coordinates).
        params: the trainable parameters, in the strategy's order.
        sample_rate: :math:`q`, the Poisson rate of the real examples.
        norm: :math:`N`, the norm of each canary's gradient before clipping.
        seed: seeds the choice of coordinates, signs, inclusion and per-step sampling.
    """

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
        self.initial = self._coordinates()

    def _coordinates(self) -> Tensor:
        """The canaries' coordinates of the current parameters, float64 on the CPU."""
        out = torch.empty(self.m, dtype=torch.float64)
        for i, p in enumerate(self.params):
            mask = self.param_index == i
            if mask.any():
                out[mask] = p.detach().reshape(-1)[self.offset[mask].to(p.device)].double().cpu()
        return out

    def add_to_sum(
        self,
        summed: dict[nn.Parameter, Tensor],
        params: list[nn.Parameter],
        clip_factors: Callable[[Tensor], Tensor],
        rank: int,
    ) -> None:
        r"""Add :math:`\sum_j C_j g_j` of this step's sampled canaries into ``summed`` (rank 0 only).

        Called by the strategy once per optimizer step, after the real examples' clipped sum is
        complete and before the noise.
        """
        if rank != 0:
            return
        if [id(p) for p in params] != [id(p) for p in self.params]:
            raise RuntimeError(
                "PrivacyAudit: the strategy's trainable parameters changed since the audit started."
            )
        sampled = self.included & (torch.rand(self.m, generator=self._generator) < self.sample_rate)
        if not sampled.any():
            return
        self.sampled_count += sampled.long()
        idx = sampled.nonzero().squeeze(1)
        device = params[0].device
        norms = torch.full((len(idx),), self.norm, dtype=torch.float32, device=device)
        # the one non-zero entry of C_j g_j
        values = clip_factors(norms).double() * self.norm * self.sign[idx].to(device)
        for i, p in enumerate(self.params):
            mask = self.param_index[idx] == i
            if not mask.any():
                continue
            target = summed.get(p)
            if target is None or not target.is_contiguous():
                base = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                target = summed[p] = base if target is None else target.contiguous()
            flat = target.view(-1)
            flat.index_add_(0, self.offset[idx][mask].to(device), values[mask.to(device)].to(flat.dtype))

    def scores(self) -> np.ndarray:
        r"""``s_j = -sign_j (theta_T - theta_0)[c_j]``, the final coordinates averaged over ranks."""
        final = self._coordinates()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = self.params[0].device
            final_dev = final.to(device)
            dist.all_reduce(final_dev, op=dist.ReduceOp.SUM)
            final = final_dev.cpu() / dist.get_world_size()
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
        strategy.canaries = self.canaries

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.canaries is None:
            return
        trainer.strategy.canaries = None
        budget = _find_budget(trainer)
        delta = self.delta if self.delta is not None else float(budget.delta)  # type: ignore[union-attr]
        scores = self.canaries.scores()  # a collective under DDP: every rank calls it
        self.result = audit_scores(scores, self.canaries.included.numpy(), delta, self.confidence)
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

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(trainer.strategy, "canaries", None) is self.canaries:
            trainer.strategy.canaries = None

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
