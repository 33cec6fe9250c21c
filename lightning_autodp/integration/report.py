"""A privacy report: epsilon against epoch, the validation metric, and the metric against epsilon.

Two ways to get the picture:

* during training, add :class:`PrivacyReport` next to :class:`~lightning_autodp.PrivacyBudget`;
  at the end of ``fit`` it writes ``privacy_report.png`` into ``trainer.log_dir``::

      trainer = L.Trainer(
          strategy="dp_auto",
          callbacks=[PrivacyBudget(target_epsilon=3.0, delta=1e-5), PrivacyReport(metric="val_acc")],
      )

* afterwards, from what was saved: a ``metrics.csv`` written by Lightning's ``CSVLogger`` (or the
  folder holding it), or a checkpoint written while both callbacks were attached::

      from lightning_autodp.integration.report import plot_privacy_report
      plot_privacy_report("lightning_logs/version_0/metrics.csv", "report.png", metric="val_acc")
      plot_privacy_report("checkpoints/last.ckpt", "report.png")

The epsilon curve is the accountant's spent budget after each epoch (``PrivacyBudget.history``); it
grows roughly like ``sqrt(steps)`` under RDP/PRV composition of the subsampled Gaussian mechanism.
:class:`PrivacyReport` takes it from the first of the Trainer's callbacks that is an
:class:`EpsilonHistory` (``history``, ``target_epsilon``, ``delta``): ``PrivacyBudget`` is one, and a
budget callback of your own that has those three attributes is drawn the same way.
The third panel pairs the two by epoch: the metric after epoch ``e`` against the epsilon spent after
epoch ``e`` (the privacy-utility curve: what each extra unit of epsilon bought).
Drawing uses matplotlib's Agg canvas directly, so no display and no global pyplot state is needed.
matplotlib is an optional dependency: ``pip install "lightning-autodp[report]"``.
"""

from __future__ import annotations

import csv
import importlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_autodp.integration.callbacks import PrivacyBudget, state_key_class
from lightning_autodp.safeguards.audit.canaries import audit_lower_bound

__all__ = [
    "EpsilonHistory",
    "PrivacyReport",
    "draw_privacy_report",
    "metric_against_epsilon",
    "plot_privacy_report",
    "read_checkpoint_history",
    "read_metrics_csv",
]

Series = list[tuple[float, float]]

MATPLOTLIB_HINT = 'pip install "lightning-autodp[report]" (or pip install matplotlib)'


def require_matplotlib() -> None:
    """Raise an ``ImportError`` naming the install command when matplotlib is missing."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as err:
        raise ImportError(
            f"The privacy report draws with matplotlib, which is not installed: {MATPLOTLIB_HINT}."
        ) from err


def metric_against_epsilon(
    epsilon: Sequence[tuple[float, float]], metric: Sequence[tuple[float, float]]
) -> Series:
    """``(epsilon, value)`` for every epoch present in both ``(epoch, x)`` series, in epoch order.

    Both series hold the value at the end of each epoch: the metric validated after epoch ``e``'s
    training steps and the epsilon those steps had spent. An epoch missing from either (no
    validation that epoch, or a run stopped mid-epoch before validating) is left out.

    Example::

        >>> metric_against_epsilon([(0, 0.5), (1, 0.8)], [(0, 0.6), (1, 0.7), (2, 0.9)])
        [(0.5, 0.6), (0.8, 0.7)]
    """
    eps_by_epoch = dict(_last_per_epoch(epsilon))
    return [(eps_by_epoch[e], v) for e, v in _last_per_epoch(metric) if e in eps_by_epoch]


def _pad_single_x(ax: Any, xs: Sequence[float]) -> None:
    # matplotlib centres a single point in a +-5% window (-0.045..0.045 for epoch 0): show a unit around it.
    if min(xs) == max(xs):
        ax.set_xlim(xs[0] - 1, xs[0] + 1)


def _last_per_epoch(points: Iterable[tuple[float, float]]) -> Series:
    # Loggers may record a metric several times in one epoch (e.g. val every n steps): the value at
    # the end of the epoch is the one that belongs on an epoch axis.
    by_epoch: dict[float, float] = {}
    for epoch, value in points:
        by_epoch[float(epoch)] = float(value)
    return sorted(by_epoch.items())


def draw_privacy_report(
    epsilon: Sequence[tuple[float, float]],
    metric: Sequence[tuple[float, float]] | None,
    out_png: str | Path,
    *,
    metric_name: str = "val_acc",
    target_epsilon: float | None = None,
    delta: float | None = None,
    title: str | None = None,
    audit_lower_bound: float | None = None,
) -> Path:
    """Draw epsilon against epoch, the metric against epoch, and the metric against epsilon into a PNG.

    Args:
        epsilon: ``(epoch, epsilon)`` pairs, the privacy spent after each epoch.
        metric: ``(epoch, value)`` pairs of the validation metric, or ``None``/empty to draw only
            the epsilon panel. With a metric the figure has three panels (15 x 4 inches).
        out_png: where to write; parent folders are created.
        metric_name: label of the metric panel.
        target_epsilon: drawn as a dashed horizontal line when given.
        delta: shown in the epsilon panel's title when given.
        audit_lower_bound: a :class:`~lightning_autodp.safeguards.audit.PrivacyAudit`'s empirical lower bound,
            drawn as a dotted line beside the accounted epsilon when given.

    Returns:
        The path written.

    Example::

        >>> draw_privacy_report([(0, 0.8), (1, 1.2)], [(0, 0.7), (1, 0.8)], "/tmp/r.png")
        PosixPath('/tmp/r.png')
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not epsilon:
        raise ValueError(
            "No epsilon values to draw. Train with the PrivacyBudget callback attached (it records "
            "epsilon after every epoch), or pass a metrics.csv that has an 'epsilon' column."
        )
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    has_metric = bool(metric)
    fig = Figure(figsize=(15 if has_metric else 5.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if has_metric else 1, squeeze=False)[0]

    ax = axes[0]
    xs, ys = zip(*epsilon, strict=True)
    ax.plot(xs, ys, marker="o", color="tab:red", label="epsilon spent")
    if target_epsilon is not None and math.isfinite(target_epsilon):
        ax.axhline(target_epsilon, linestyle="--", color="grey", label=f"target {target_epsilon:g}")
    if audit_lower_bound is not None:  # audit
        label = f"audit lower bound {audit_lower_bound:.2f}"
        ax.axhline(audit_lower_bound, linestyle=":", color="black", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _pad_single_x(ax, xs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("epsilon")
    ax.set_ylim(bottom=0)
    ax.set_title("privacy spent" + (f" (delta = {delta:.0e})" if delta is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")

    if has_metric:
        ax = axes[1]
        mx, my = zip(*metric, strict=True)
        ax.plot(mx, my, marker="o", color="tab:blue")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _pad_single_x(ax, mx)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric_name)
        ax.set_title(f"{metric_name} per epoch (final {my[-1]:.4g})")
        ax.grid(alpha=0.3)
        _draw_metric_against_epsilon(axes[2], metric_against_epsilon(epsilon, metric), metric_name)
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=100)
    return out


def _draw_metric_against_epsilon(ax: Any, curve: Series, metric_name: str) -> None:
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel(metric_name)
    ax.grid(alpha=0.3)
    if not curve:
        ax.set_title(f"{metric_name} against epsilon (no epoch has both)")
        return
    ex, ey = zip(*curve, strict=True)
    ax.plot(ex, ey, marker="o", color="tab:purple")
    if min(ex) == max(ex):
        ax.set_xlim(0, 2 * ex[0])
    ax.set_xlim(left=0)
    ax.set_title(f"{metric_name} against epsilon (final {ey[-1]:.4g} at epsilon {ex[-1]:.3g})")


def read_metrics_csv(path: str | Path, metric: str = "val_acc") -> tuple[Series, Series]:
    """``(epsilon_history, metric_history)`` from a ``CSVLogger`` ``metrics.csv`` (or its folder).

    Each history is a list of ``(epoch, value)``, the last value logged in each epoch.

    Example::

        eps, acc = read_metrics_csv("lightning_logs/version_0/metrics.csv", "val_acc")
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0]) if rows else set()
    if "epsilon" not in columns:
        raise ValueError(
            f"{path} has no 'epsilon' column (columns: {sorted(columns)}). Attach the PrivacyBudget "
            "callback during training: it logs 'epsilon' after every epoch."
        )
    if "epoch" not in columns:
        raise ValueError(f"{path} has no 'epoch' column; is it a Lightning CSVLogger metrics.csv?")

    def series(name: str) -> Series:
        return _last_per_epoch(
            (float(r["epoch"]), float(r[name])) for r in rows if r.get(name) not in (None, "")
        )

    return series("epsilon"), series(metric) if metric in columns else []


def _find_state(callbacks: dict[str, Any], owner: type[Callback], key: str) -> dict[str, Any] | None:
    """The checkpointed state of an ``owner`` callback holding ``key``, else of any callback holding it.

    A checkpoint keeps each callback's state under the callback's ``state_key``; the owner's is told
    by its class name (:func:`~lightning_autodp.integration.callbacks.state_key_class`). The second
    pass finds the state of a callback of your own (an :class:`EpsilonHistory` saving ``history``)
    under whatever key it has.
    """
    for name, state in callbacks.items():
        if state_key_class(str(name)) == owner.__qualname__ and isinstance(state, dict) and key in state:
            return state
    for state in callbacks.values():
        if isinstance(state, dict) and key in state:
            return state
    return None


def read_checkpoint_history(
    checkpoint: str | Path | dict[str, Any],
) -> tuple[Series, Series, str | None, dict[str, Any]]:
    """``(epsilon_history, metric_history, metric_name, budget_state)`` from a checkpoint.

    The epsilon history comes from the ``PrivacyBudget`` state (``history``: ``(epoch, step,
    epsilon)`` triples); the metric history from the :class:`PrivacyReport` state when that
    callback was attached, else it is empty. Only load checkpoints you trust: a Lightning checkpoint
    is a pickle.

    Example::

        eps, metric, name, budget = read_checkpoint_history("last.ckpt")
    """
    if isinstance(checkpoint, dict):
        ckpt = checkpoint
    else:
        import torch

        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    callbacks = ckpt.get("callbacks") or {}
    budget = _find_state(callbacks, PrivacyBudget, "history")
    if budget is None:
        raise ValueError(
            "The checkpoint holds no PrivacyBudget state. Attach PrivacyBudget(...) to the Trainer "
            "that writes the checkpoint, or draw from the run's metrics.csv instead."
        )
    eps = _last_per_epoch((float(h[0]), float(h[-1])) for h in budget["history"])
    report = _find_state(callbacks, PrivacyReport, "metric_history")
    if report is None:
        return eps, [], None, budget
    metric = _last_per_epoch((float(e), float(v)) for e, v in report["metric_history"])
    return eps, metric, report.get("metric"), budget


def plot_privacy_report(
    source: str | Path,
    out_png: str | Path,
    metric: str = "val_acc",
    *,
    target_epsilon: float | None = None,
    delta: float | None = None,
) -> Path:
    """Draw the privacy report again from a ``metrics.csv`` (or its folder) or a ``.ckpt`` file.

    Args:
        source: a Lightning ``CSVLogger`` ``metrics.csv``, the folder holding it, or a checkpoint.
        out_png: where to write the PNG.
        metric: the validation metric to draw beside epsilon (from the CSV; a checkpoint carries
            the one :class:`PrivacyReport` recorded).
        target_epsilon, delta: annotations; taken from the checkpoint's PrivacyBudget state
            when not given and available there.

    Example::

        plot_privacy_report("lightning_logs/version_0/metrics.csv", "privacy_report.png")
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a metrics.csv, its folder, or a .ckpt file.")
    if source.is_dir() or source.suffix == ".csv":
        eps, values = read_metrics_csv(source, metric)
        name = metric
    else:
        eps, values, name, budget = read_checkpoint_history(source)
        name = name or metric
        if target_epsilon is None:
            target_epsilon = budget.get("target_epsilon")
        if delta is None:
            delta = budget.get("delta")
    return draw_privacy_report(
        eps, values, out_png, metric_name=name, target_epsilon=target_epsilon, delta=delta
    )


@runtime_checkable
class EpsilonHistory(Protocol):
    """A callback that records the epsilon spent after every epoch: what :class:`PrivacyReport` draws.

    :class:`~lightning_autodp.PrivacyBudget` is one. A budget callback of your own is drawn too when
    it has these three attributes (plain attributes or properties):

    * ``history``: one ``(epoch, ..., epsilon)`` tuple per finished epoch, epoch first and epsilon
      last (``PrivacyBudget`` records ``(epoch, step, epsilon)``);
    * ``target_epsilon``: drawn as a dashed line, or ``None`` for none;
    * ``delta``: shown in the epsilon panel's title, or ``None``.

    Example::

        class MyBudget(Callback):
            target_epsilon, delta = 8.0, 1e-5

            def __init__(self):
                self.history = []  # (epoch, step, epsilon), appended in on_train_epoch_end

        assert isinstance(MyBudget(), EpsilonHistory)
    """

    @property
    def history(self) -> Sequence[tuple[float, ...]]: ...

    @property
    def target_epsilon(self) -> float | None: ...

    @property
    def delta(self) -> float | None: ...


def _find_budget(trainer: pl.Trainer) -> EpsilonHistory | None:
    """The first of the Trainer's callbacks that is an :class:`EpsilonHistory`, else ``None``."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EpsilonHistory)), None)


class PrivacyReport(Callback):
    """Write ``privacy_report.png`` (epsilon and a validation metric per epoch) at the end of fit.

    It reads the epsilon history from the :class:`~lightning_autodp.PrivacyBudget` callback
    attached to the same Trainer (or from another :class:`EpsilonHistory`) and records
    ``trainer.callback_metrics[metric]`` after every validation run. It reads the metric in
    ``on_validation_end``, as ``EarlyStopping`` and ``ModelCheckpoint`` do: Lightning calls
    callbacks' ``on_validation_epoch_end`` *before* the LightningModule's own, so a metric the
    module logs there would be read one epoch late. The file goes to ``trainer.log_dir`` (the
    logger's folder, e.g. ``lightning_logs/version_0``). The recorded metric history is saved in
    checkpoints, so :func:`plot_privacy_report` can redraw the picture from a checkpoint.

    Args:
        metric: name of the logged validation metric to draw beside epsilon.
        filename: name of the PNG inside ``trainer.log_dir``.

    Example::

        trainer = L.Trainer(strategy="dp_auto",
                            callbacks=[PrivacyBudget(target_epsilon=3.0), PrivacyReport("val_acc")])
        trainer.fit(model, datamodule)
        print(trainer.callbacks[-1].path)  # .../lightning_logs/version_0/privacy_report.png
    """

    def __init__(self, metric: str = "val_acc", filename: str = "privacy_report.png") -> None:
        require_matplotlib()  # now, not after hours of training at the end of fit
        self.metric = metric
        self.filename = filename
        self.metric_history: list[tuple[int, float]] = []
        self.path: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(metric=self.metric)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self.metric_history.append((trainer.current_epoch, float(value)))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ``trainer.log_dir`` is a collective (a broadcast from rank 0) under DDP: every rank must
        # ask for it, outside the rank-zero-only drawing, or rank 0 waits for peers that moved on.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self._draw(trainer, Path(log_dir))

    @rank_zero_only
    def _draw(self, trainer: pl.Trainer, log_dir: Path) -> None:
        budget = _find_budget(trainer)
        if budget is None:
            rank_zero_warn(
                "PrivacyReport found no PrivacyBudget callback, so there is no epsilon to draw. "
                "Add PrivacyBudget(target_epsilon=..., delta=...) to the Trainer's callbacks."
            )
            return
        eps = _last_per_epoch((float(h[0]), float(h[-1])) for h in budget.history)
        if not eps:
            rank_zero_warn("PrivacyReport: PrivacyBudget recorded no epoch yet; nothing to draw.")
            return
        if not self.metric_history:
            rank_zero_warn(
                f"PrivacyReport: metric {self.metric!r} was never logged during validation "
                f"(logged: {sorted(trainer.callback_metrics)}); drawing epsilon only. Pass the name "
                "you give self.log(...) in validation_step, e.g. PrivacyReport(metric='val_loss')."
            )
        out = log_dir / self.filename
        self.path = draw_privacy_report(
            eps,
            _last_per_epoch(self.metric_history),
            out,
            metric_name=self.metric,
            target_epsilon=budget.target_epsilon,
            delta=budget.delta,
            audit_lower_bound=audit_lower_bound(trainer),  # audit: a PrivacyAudit's bound, if one ran
        )
        rank_zero_info(f"PrivacyReport: wrote {self.path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "metric_history": list(self.metric_history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metric_history = [(int(e), float(v)) for e, v in state_dict.get("metric_history", [])]
