"""Privacy auditing: an empirical lower bound on epsilon from one training run.

* :class:`PrivacyAudit`: a callback that inserts ``m`` white-box gradient canaries into a
  ``strategy="dp_auto"`` run and reports an epsilon lower bound at the end of ``fit``.
* :func:`audit_scores`, :func:`epsilon_lower_bound`, :func:`p_value`: the bound of Steinke, Nasr and
  Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023), for any canary scores
  (e.g. black-box input-space canaries scored by their loss).
* ``python -m lightning_autodp.safeguards.audit``: audit a small model on scikit-learn's digits.

See ``docs/concepts/auditing.md`` for what the bound proves and what it does not.
"""

from lightning_autodp.safeguards.audit.bound import (
    AuditResult,
    audit_ceiling,
    audit_scores,
    canaries_needed,
    epsilon_lower_bound,
    max_certifiable_epsilon,
    p_value,
)
from lightning_autodp.safeguards.audit.canaries import GradientCanaries, PrivacyAudit

__all__ = [
    "AuditResult",
    "audit_ceiling",
    "canaries_needed",
    "GradientCanaries",
    "PrivacyAudit",
    "audit_scores",
    "epsilon_lower_bound",
    "max_certifiable_epsilon",
    "p_value",
]
