"""The privacy report: PNG written at the end of fit, and redrawn from metrics.csv or a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_autodp.integration.report as report_module
from lightning_autodp.integration.callbacks import PrivacyBudget, state_key_class
from lightning_autodp.integration.report import (
    EpsilonHistory,
    PrivacyReport,
    _find_budget,
    _pad_single_x,
    draw_privacy_report,
    metric_against_epsilon,
    plot_privacy_report,
    read_checkpoint_history,
    read_metrics_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, width: int | None = None) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # axes, curves and labels, not a blank canvas
    image = imread(path)
    if width is not None:
        assert image.shape[1] == width
    # Something is drawn: the picture is not a single colour.
    assert float(image[..., :3].std()) > 0.01


def _eps_at(epoch: int) -> float:
    return 0.5 * math.sqrt(epoch + 1)


class FakeBudget(Callback):
    """Stands in for PrivacyBudget: same public surface (``epsilon``, ``history``, logged key)."""

    target_epsilon = 2.0
    delta = 1e-5

    def __init__(self) -> None:
        self.history: list[tuple[int, int, float]] = []

    @property
    def epsilon(self) -> float:
        return self.history[-1][2] if self.history else 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        eps = _eps_at(trainer.current_epoch)
        self.history.append((trainer.current_epoch, trainer.global_step, eps))
        pl_module.log("epsilon", eps, prog_bar=True)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "target_epsilon": self.target_epsilon, "delta": self.delta}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


class TinyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.layer(x).argmax(-1) == y).float().mean()
        self.log("val_acc", acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def _fit(tmp_path: Path, callbacks: list[Callback], epochs: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(TinyModel(), _loader(), _loader())
    return trainer


def test_draw_writes_a_png(tmp_path: Path) -> None:
    out = draw_privacy_report(
        [(0, 0.5), (1, 0.8), (2, 1.0)],
        [(0, 0.6), (1, 0.7), (2, 0.75)],
        tmp_path / "sub" / "r.png",
        target_epsilon=1.0,
        delta=1e-5,
    )
    assert out == tmp_path / "sub" / "r.png"
    _assert_png(out, width=1500)  # three panels side by side at 15 x 4 inches, 100 dpi
    only_eps = draw_privacy_report([(0, 0.5), (1, 0.8)], None, tmp_path / "eps.png")
    _assert_png(only_eps, width=550)


def test_draw_without_epsilon_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PrivacyBudget"):
        draw_privacy_report([], [(0, 0.5)], tmp_path / "r.png")


def test_report_at_end_of_fit_and_redraw_from_csv_and_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget, report = FakeBudget(), PrivacyReport(metric="val_acc")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    said: list[str] = []
    monkeypatch.setattr(report_module, "rank_zero_info", said.append)
    trainer = _fit(tmp_path, [budget, report, ckpt], epochs=3)

    # Written at the end of fit, into the logger's folder, and the path is said.
    assert report.path == Path(trainer.log_dir) / "privacy_report.png"
    assert said == [f"PrivacyReport: wrote {report.path}"]
    _assert_png(report.path, width=1500)

    # The CSV holds what the callbacks logged, one value per epoch.
    eps, acc = read_metrics_csv(Path(trainer.log_dir) / "metrics.csv", "val_acc")
    assert eps == [(float(e), pytest.approx(_eps_at(e))) for e in range(3)]
    assert [e for e, _ in acc] == [0.0, 1.0, 2.0]
    assert [v for _, v in acc] == pytest.approx([v for _, v in report.metric_history])
    out = plot_privacy_report(trainer.log_dir, tmp_path / "from_csv.png")  # the folder works too
    _assert_png(out, width=1500)

    # The checkpoint carries both histories.
    eps_c, acc_c, name, state = read_checkpoint_history(tmp_path / "ckpt" / "last.ckpt")
    assert eps_c == [(float(e), pytest.approx(_eps_at(e))) for e in range(3)]
    assert acc_c == [(float(e), pytest.approx(v)) for e, v in report.metric_history]
    assert name == "val_acc" and state["target_epsilon"] == FakeBudget.target_epsilon
    _assert_png(plot_privacy_report(tmp_path / "ckpt" / "last.ckpt", tmp_path / "from_ckpt.png"), width=1500)


def test_report_state_survives_resume(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path, [FakeBudget(), PrivacyReport(), ckpt], epochs=2)
    report = PrivacyReport()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[FakeBudget(), report],
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(TinyModel(), _loader(), _loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [e for e, _ in report.metric_history] == [0, 1, 2]
    _assert_png(report.path)


def test_missing_pieces_warn_or_raise(tmp_path: Path) -> None:
    report = PrivacyReport()
    with pytest.warns(UserWarning, match="no PrivacyBudget"):
        _fit(tmp_path, [report], epochs=1)
    assert report.path is None

    report = PrivacyReport(metric="not_logged")
    with pytest.warns(UserWarning, match="never logged"):
        _fit(tmp_path, [FakeBudget(), report], epochs=1)
    _assert_png(report.path, width=550)  # epsilon panel only

    trainer = _fit(tmp_path, [], epochs=1)
    with pytest.raises(ValueError, match="no 'epsilon' column"):
        read_metrics_csv(Path(trainer.log_dir) / "metrics.csv")
    with pytest.raises(FileNotFoundError):
        plot_privacy_report(tmp_path / "nope.csv", tmp_path / "x.png")


def test_real_budget_epsilon_in_csv_tensorboard_progress_bar_and_report(tmp_path: Path) -> None:
    # The real PrivacyBudget under dp_auto (not FakeBudget): the epsilon it records each epoch is
    # what every logger receives, what the progress bar shows, and what the PNG is drawn from.
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_autodp import DPAutoStrategy, PrivacyBudget

    budget, report = PrivacyBudget(delta=1e-5), PrivacyReport(metric="val_acc")
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer = L.Trainer(
        strategy=DPAutoStrategy(noise_multiplier=1.0),
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        logger=[csv_logger, tb_logger],
        callbacks=[budget, report],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(TinyModel(), _loader(), _loader())

    history = [(float(e), eps) for e, _, eps in budget.history]
    assert [e for e, _ in history] == [0.0, 1.0, 2.0]
    assert all(b > a > 0 for (_, a), (_, b) in zip(history, history[1:]))  # spent budget only grows

    eps_csv, _ = read_metrics_csv(Path(csv_logger.log_dir) / "metrics.csv")
    assert eps_csv == [(e, pytest.approx(v)) for e, v in history]

    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    assert [s.value for s in events.Scalars("epsilon")] == pytest.approx([v for _, v in history])

    assert float(trainer.progress_bar_metrics["epsilon"]) == pytest.approx(budget.epsilon)
    assert report.path == Path(trainer.log_dir) / "privacy_report.png"
    _assert_png(report.path, width=1500)


class LogsInEpochEndModel(TinyModel):
    """The common pattern: accumulate in validation_step, log the epoch's value in on_validation_epoch_end."""

    def __init__(self) -> None:
        super().__init__()
        self.correct: list[torch.Tensor] = []
        self.logged: list[tuple[int, float]] = []  # ground truth: what this module logged, per epoch

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.correct.append((self.layer(x).argmax(-1) == y).float())

    def on_validation_epoch_end(self) -> None:
        # Depends on the epoch so that a value read one epoch late is told apart from the right one.
        value = torch.cat(self.correct).mean() + self.current_epoch
        self.correct.clear()
        self.log("val_score", value)
        if not self.trainer.sanity_checking:
            self.logged.append((self.current_epoch, float(value)))


def test_report_reads_a_metric_logged_in_the_modules_on_validation_epoch_end(tmp_path: Path) -> None:
    # Lightning calls the callbacks' on_validation_epoch_end before the module's: a report reading
    # there draws each epoch's metric one epoch late and loses the last one.
    budget, report = FakeBudget(), PrivacyReport(metric="val_score")
    model = LogsInEpochEndModel()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[budget, report],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,  # the sanity check's value must not be recorded either
        log_every_n_steps=1,
    )
    trainer.fit(model, _loader(), _loader())
    assert len(model.logged) == 3
    assert [(e, pytest.approx(v)) for e, v in model.logged] == report.metric_history
    # The CSV logger, an independent reader, agrees.
    _, from_csv = read_metrics_csv(Path(trainer.log_dir) / "metrics.csv", "val_score")
    assert [(float(e), pytest.approx(v)) for e, v in model.logged] == from_csv
    # The privacy-utility curve pairs each epoch's metric with that epoch's epsilon.
    eps_by_epoch = {e: eps for e, _, eps in budget.history}
    assert metric_against_epsilon([(e, x) for e, _, x in budget.history], report.metric_history) == [
        (pytest.approx(eps_by_epoch[e]), pytest.approx(v)) for e, v in model.logged
    ]
    _assert_png(report.path, width=1500)


def test_metric_against_epsilon_drops_epochs_missing_from_either_series() -> None:
    eps = [(0.0, 0.5), (1.0, 0.7), (2.0, 0.9)]
    metric = [(1.0, 0.6), (1.0, 0.65), (2.0, 0.8), (3.0, 0.85)]  # epoch 0 not validated, 1 twice
    assert metric_against_epsilon(eps, metric) == [(0.7, 0.65), (0.9, 0.8)]


def test_one_epoch_axis_spans_a_unit_around_the_point() -> None:
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    ax.plot([0.0], [1.0])
    _pad_single_x(ax, [0.0])
    assert ax.get_xlim() == (-1.0, 1.0)


def test_a_one_epoch_report_has_readable_x_axes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The figure as drawn (not the helper alone): every epoch axis spans a unit around epoch 0, and
    # the metric-against-epsilon axis starts at 0 and holds the point, instead of -0.045..0.045.
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k)))
    draw_privacy_report([(0.0, 2.9)], [(0.0, 0.8)], tmp_path / "one.png")
    eps_ax, metric_ax, curve_ax = drawn[0].axes
    assert eps_ax.get_xlim() == metric_ax.get_xlim() == (-1.0, 1.0)
    left, right = curve_ax.get_xlim()
    assert left == 0.0 and right > 2.9


def test_missing_matplotlib_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when absent
    with pytest.raises(ImportError, match=r"lightning-autodp\[report\]"):
        PrivacyReport(metric="val_acc")


class OwnBudget(Callback):
    """A user's own budget callback: the three attributes of EpsilonHistory, one of them a property."""

    target_epsilon = None
    delta = 1e-6

    def __init__(self) -> None:
        self._history = [(0, 4, 0.25)]

    @property
    def history(self) -> list[tuple[int, int, float]]:
        return self._history


def test_privacy_budget_and_a_users_own_callback_are_epsilon_histories() -> None:
    budget, own = PrivacyBudget(target_epsilon=3.0), OwnBudget()
    assert isinstance(budget, EpsilonHistory) and isinstance(own, EpsilonHistory)
    assert isinstance(FakeBudget(), EpsilonHistory)
    assert not isinstance(PrivacyReport(), EpsilonHistory)
    # the first EpsilonHistory among the callbacks is the one drawn
    assert _find_budget(SimpleNamespace(callbacks=[PrivacyReport(), own, budget])) is own


@pytest.mark.parametrize("missing", ["history", "target_epsilon", "delta"])
def test_a_callback_lacking_one_attribute_is_not_an_epsilon_history(missing: str) -> None:
    # mutation: a finder that tests for any single attribute (hasattr) finds these
    attributes = {"history": [(0, 4, 0.25)], "target_epsilon": 2.0, "delta": 1e-5}
    del attributes[missing]
    partial = type("Partial", (Callback,), attributes)()
    assert not isinstance(partial, EpsilonHistory)
    assert _find_budget(SimpleNamespace(callbacks=[partial])) is None
    assert _find_budget(SimpleNamespace(callbacks=[partial, OwnBudget()])) is not partial


def test_checkpoint_state_of_the_privacy_budget_is_found_by_its_state_key() -> None:
    budget = PrivacyBudget(target_epsilon=3.0, delta=1e-5)
    assert state_key_class(budget.state_key) == "PrivacyBudget"
    assert state_key_class(PrivacyReport(metric="val_loss").state_key) == "PrivacyReport"
    assert state_key_class("ModelCheckpoint") == "ModelCheckpoint"
    # Another callback's state with a "history" comes first; the PrivacyBudget's is the one read.
    callbacks = {
        "OtherCallback": {"history": [[0, 9, 9.0]]},
        budget.state_key: {"history": [[0, 5, 1.0], [1, 10, 1.5]], "target_epsilon": 3.0, "delta": 1e-5},
        "Unrelated{'metric_history': 1}": {"metric_history": [[0, 0.1]]},
        PrivacyReport(metric="val_loss").state_key: {"metric": "val_loss", "metric_history": [[0, 0.5]]},
    }
    eps, metric, name, state = read_checkpoint_history({"callbacks": callbacks})
    assert eps == [(0.0, 1.0), (1.0, 1.5)] and state["target_epsilon"] == 3.0
    assert metric == [(0.0, 0.5)] and name == "val_loss"
    # without a PrivacyBudget's key, a user's own callback's state holding a history is read
    del callbacks[budget.state_key]
    assert read_checkpoint_history({"callbacks": callbacks})[0] == [(0.0, 9.0)]
