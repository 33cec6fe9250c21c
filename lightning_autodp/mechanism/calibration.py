r"""The calibration protocol: who may propose :math:`\sigma`, and what they are told.

The strategy owns the noise multiplier. When the user leaves it to be chosen
(``noise_multiplier="auto"`` or ``None``), the strategy asks one :class:`NoiseCalibrator` (the
:class:`~lightning_autodp.PrivacyBudget` callback implements it) exactly once per fit, at the
start of training, once the sample rate :math:`q` and the planned number of optimizer steps
:math:`T` are known:

.. math::

    \sigma = \min\{\sigma' :
        \varepsilon(\text{spent} \circ (\sigma', q)^{T}) \le \varepsilon_{\text{target}}\}

(the calibrator's accountant decides how tight the minimum is). The request carries everything
the answer depends on, so the answer does not depend on when, or by whom, it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from lightning_autodp.mechanism.accounting import Segment


@dataclass(frozen=True)
class CalibrationRequest:
    """What a calibrator chooses sigma for.

    Attributes:
        sample_rate: :math:`q`, the probability that one example enters one optimizer step.
        planned_steps: :math:`T`, the optimizer steps this fit plans (``None``: no planned end).
        spent: the ``(sigma, q, steps)`` segments already spent (a resumed run's ledger).
    """

    sample_rate: float
    planned_steps: int | None
    spent: tuple[Segment, ...] = ()


@runtime_checkable
class NoiseCalibrator(Protocol):
    """Chooses the noise multiplier for a planned run, and accounts what the run spends.

    A strategy finds its calibrator among the Trainer's callbacks by this protocol (the first one
    listed, if several); a checkpoint written while one was attached can only be resumed with one,
    so that the resumed run's epsilon is reported too.
    """

    def calibrate_noise_multiplier(self, request: CalibrationRequest) -> float:
        """The sigma for ``request``; raise ``ValueError`` naming the fix when there is none."""
        ...


__all__ = ["CalibrationRequest", "NoiseCalibrator"]
