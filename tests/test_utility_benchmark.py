"""benchmarks/utility.py: fair grids, learning-rate choice by validation, paired seeds, resumability."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def utility():
    spec = importlib.util.spec_from_file_location("utility_benchmark", ROOT / "benchmarks" / "utility.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("grid", "tasks"),
    [
        ("smoke", ["digits", "char_lm", "text"]),
        ("full", ["digits", "char_lm", "text"]),
        ("sgd", ["digits"]),
        ("batch_eps1", ["digits"]),
    ],
)
def test_every_method_gets_the_same_lr_trials_and_seeds(utility, grid, tasks):
    configs = utility.build_grid(grid, tasks)
    assert len({c.key() for c in configs}) == len(configs), "duplicate configurations"
    trials = defaultdict(lambda: defaultdict(set))
    for c in configs:
        table = (c.task, c.study, c.epsilon, c.optimizer, c.batch_size, c.epochs)
        trials[table][c.method].add((c.lr, c.seed))
    for table, methods in trials.items():
        budgets = set(map(frozenset, methods.values()))
        assert len(budgets) == 1, f"unequal trials in {table}"
        assert "auto_s g=0.01" in methods and any(m.startswith("abadi") for m in methods), table
        if grid != "smoke":
            assert len({seed for _, seed in next(iter(budgets))}) >= 3, table


@pytest.mark.parametrize(
    ("task", "joined"), [("digits", ["sgd_schedule", "sgd"]), ("char_lm", []), ("text", ["full"])]
)
def test_psac_joins_its_tables_with_the_same_lr_trials_and_seeds(utility, task, joined):
    psac = utility.build_grid("psac", [task])
    configs = psac + [c for grid in joined for c in utility.build_grid(grid, [task])]
    assert len({c.key() for c in configs}) == len(configs), "PSAC reruns a configuration"
    trials = defaultdict(lambda: defaultdict(set))
    for c in configs:
        trials[(c.task, c.study, c.epsilon, c.optimizer, c.batch_size, c.epochs)][c.method].add(
            (c.lr, c.seed)
        )
    with_psac = {t for t, methods in trials.items() if "psac r=0.1" in methods}
    assert with_psac == {(c.task, c.study, c.epsilon, c.optimizer, c.batch_size, c.epochs) for c in psac}
    for table in with_psac:
        methods = trials[table]
        assert len(set(map(frozenset, methods.values()))) == 1, f"unequal trials in {table}"
        assert "auto_s g=0.01" in methods and any(m.startswith("abadi") for m in methods), table


@pytest.mark.parametrize("task", ["digits", "char_lm", "text"])
def test_psac_r_reruns_psacs_trials_at_a_larger_r(utility, task):
    def trial(c):
        return (c.task, c.study, c.epsilon, c.optimizer, c.batch_size, c.epochs, c.lr, c.seed)

    at_default_r = {trial(c) for c in utility.build_grid("psac", [task]) if c.method == "psac r=0.1"}
    by_r = defaultdict(set)
    for c in utility.build_grid("psac_r", [task]):
        assert c.clipping == "psac" and c.max_grad_norm == 1.0
        by_r[c.gamma].add(trial(c))
    assert by_r.pop(1.0) == at_default_r
    epsilon_1 = {t for t in at_default_r if t[2] == 1.0}
    assert by_r == ({3.0: epsilon_1} if epsilon_1 else {})


def _package_default() -> tuple[str, float, float]:
    """(clipping, gamma, R) of ``DPAutoStrategy()``, as a user gets it."""
    from lightning_autodp import DPAutoStrategy

    strategy = DPAutoStrategy()
    return strategy.clipping, strategy.gamma, strategy.max_grad_norm


AUTO_S = ("auto_s", 0.01, 1.0)
ABADI_3 = ("abadi", 0.01, 3.0)


def _records(utility, rng, methods=None):
    """Synthetic results: 2 methods (default: the package default and Abadi R = 3) x 3 lrs x 4 seeds;
    validation rises with the lr, test falls."""
    out = []
    for clipping, gamma, r in methods or (_package_default(), ABADI_3):
        for i, lr in enumerate((1e-3, 2e-3, 5e-3)):
            for seed in range(4):
                cfg = utility.Config("digits", "main", 3.0, clipping, gamma, r, "adam", lr, seed, 64, 40)
                val, test = 0.5 + 0.1 * i + 0.05 * rng.random(), 0.9 - 0.1 * i + 0.05 * rng.random()
                res = {"val": val, "test": test, "sigma": 2.0, "steps": 800}
                out.append({"config": asdict(cfg), "result": res})
    return out


def test_summary_tunes_lr_on_validation_over_the_seeds_every_cell_has(utility):
    records = _records(utility, random.Random(0), (AUTO_S, ABADI_3))
    # Seed 3 is missing for one cell: seed 3 must then be left out of every method of the table.
    records = [
        r
        for r in records
        if not (r["config"]["clipping"] == "abadi" and r["config"]["lr"] == 2e-3 and r["config"]["seed"] == 3)
    ]
    summary = utility.summarise(records)
    for method, clipping in (("auto_s g=0.01", "auto_s"), ("abadi R=3", "abadi")):
        mine = [r for r in records if r["config"]["clipping"] == clipping and r["config"]["seed"] < 3]
        by_lr = defaultdict(list)
        for r in mine:
            by_lr[r["config"]["lr"]].append(r["result"])
        best_lr = max(by_lr, key=lambda lr: statistics.fmean(x["val"] for x in by_lr[lr]))
        s = summary[("digits", "main", 3.0, "adam", 64, 40, method)]
        assert s["lr"] == best_lr and s["n"] == 3 and s["trials"] == 3
        tests = [x["test"] for x in by_lr[best_lr]]
        assert s["mean"] == pytest.approx(statistics.fmean(tests))
    report = utility.render_report(records)
    assert "| auto_s g=0.01 |" in report and "paired" in report  # AUTO-S is no longer the default


def test_the_tables_default_is_the_clipping_dpautostrategy_uses(utility):
    clipping, gamma, r = _package_default()
    assert (
        utility.Config("digits", "main", 3.0, clipping, gamma, r, "adam", 0, 0, 64, 1).method
        == utility.DEFAULT_METHOD
    )
    assert utility.DEFAULT_METHOD != utility.AUTO_S_METHOD
    report = utility.render_report(_records(utility, random.Random(5)))
    assert f"| {utility.DEFAULT_METHOD} (default) |" in report and "The default (" in report


def test_overview_pairs_the_default_and_auto_s_with_tuned_abadi_and_marks_a_missing_default(utility):
    rng = random.Random(6)
    records = _records(utility, rng, (AUTO_S, ABADI_3))
    (row,) = utility.overview_table(records)[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "-" and cells[9] == "-"  # the default did not run in this table
    records += _records(utility, rng, (_package_default(),))
    summary = utility.summarise(records)
    table = ("digits", "main", 3.0, "adam", 64, 40)
    default, auto_s, abadi = (
        summary[(*table, m)] for m in (utility.DEFAULT_METHOD, "auto_s g=0.01", "abadi R=3")
    )
    (row,) = utility.overview_table(records)[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == f"{default['mean']:.4f}" and cells[6] == f"{auto_s['mean']:.4f}"
    for cell, ours in ((cells[9], default), (cells[10], auto_s)):
        diffs = [o - a for o, a in zip(ours["tests"], abadi["tests"])]
        gap, se = cell.split(" +- ")
        assert float(gap) == pytest.approx(statistics.fmean(diffs), abs=1e-4)
        assert float(se) == pytest.approx(statistics.stdev(diffs) / 2, abs=1e-4)


def test_sgd_learning_rate_is_divided_by_r(utility):
    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = utility.Config("digits", "main", 3.0, "abadi", 0.01, 4.0, "sgd", 0.2, 0, 64, 40)
    opt = utility.make_optimizer(params, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == pytest.approx(0.2 / 4.0)
    adam = utility.make_optimizer(params, replace(cfg, optimizer="adam"))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == pytest.approx(0.2)


def test_finished_configurations_are_not_rerun(utility, tmp_path):
    # A task that cannot run: if it were started, an error record would be appended.
    cfg = utility.Config("no_such_task", "main", 3.0, "auto_s", 0.01, 1.0, "adam", 1e-3, 0, 64, 1)
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps({"config": asdict(cfg), "result": {"val": 1, "test": 1}}) + "\n")
    before = out.read_text()
    utility.run_grid([cfg], jobs=1, accelerator="cpu", out=out)
    assert out.read_text() == before


def test_one_digits_run_spends_at_most_the_target_epsilon(utility):
    cfg = utility.Config("digits", "main", 3.0, "auto_s", 0.01, 1.0, "sgd", 0.1, 0, 64, 1)
    res = utility.run_config(cfg)
    assert res["epsilon_spent"] <= 3.0 and res["steps"] > 0 and res["sigma"] > 0
    assert 0.0 <= res["test"] <= 1.0 and 0.0 <= res["val"] <= 1.0


def test_a_configuration_recorded_twice_counts_once(utility, tmp_path):
    records = _records(utility, random.Random(1))
    out = tmp_path / "results.jsonl"
    duplicate = {**records[0], "result": {**records[0]["result"], "test": -1.0}}
    error = {"config": records[1]["config"], "error": "RuntimeError: boom"}
    out.write_text("".join(json.dumps(r) + "\n" for r in [error, *records, duplicate]))
    loaded = utility.load_records(out)
    assert len(loaded) == len(records)
    assert all("result" in r for r in loaded) and min(r["result"]["test"] for r in loaded) >= 0


def test_cosine_schedule_decays_the_sgd_learning_rate_to_zero_over_the_run(utility):
    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = utility.Config(
        "digits", "cosine", 3.0, "abadi", 0.01, 3.0, "sgd", 0.03, 0, 64, 40, schedule="cosine"
    )
    conf = utility.optimizer_config(params, cfg, total_steps=10)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.03 / 3.0)  # starts at the grid's lr * R, divided by R
    assert lrs[5] == pytest.approx(0.01 * 0.5)  # half-way: half
    assert lrs[10] == pytest.approx(0.0, abs=1e-12) and lrs[11] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    constant = utility.optimizer_config(params, utility.replace(cfg, schedule="constant"), 10)
    assert isinstance(constant, torch.optim.SGD)


def test_schedule_study_is_its_own_table_and_old_records_still_load(utility, tmp_path):
    configs = utility.build_grid("sgd_schedule", ["digits"])
    assert {(c.study, c.schedule, c.optimizer) for c in configs} == {
        ("cosine", "cosine", "sgd"),
        ("constant", "constant", "sgd"),
    }
    old = json.loads(json.dumps(_records(utility, random.Random(2))[0]))
    del old["config"]["schedule"]  # records written before the field existed
    cosine = {"config": asdict(configs[0]), "result": {"val": 0.5, "test": 0.5, "sigma": 2.0, "steps": 800}}
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps(old) + "\n" + json.dumps(cosine) + "\n")
    tables = {key[:6] for key in utility.summarise(utility.load_records(out))}
    assert ("digits", "main", 3.0, "adam", 64, 40) in tables
    assert ("digits", "cosine", 3.0, "sgd", 64, 40) in tables


def test_text_task_is_the_lora_examples_setting(utility):
    spec = utility.TASKS["text"]
    assert (spec.batch_size, spec.epochs) == (256, 3) and 3e-3 in spec.adam_lrs
    smoke = [c for c in utility.build_grid("smoke", ["text"])]
    assert all(c.small and c.batch_size <= 64 for c in smoke)  # 64 articles: q = B / N <= 1


def test_records_carry_the_machine(utility, tmp_path):
    cfg = utility.Config("digits", "main", 3.0, "auto_s", 0.01, 1.0, "adam", 1e-3, 0, 64, 1)
    out = tmp_path / "r.jsonl"
    with out.open("a") as f:
        utility._record({"config": asdict(cfg), "error": "x"}, "cpu", f, "", "test box")
    assert json.loads(out.read_text())["machine"] == "test box"


def test_fixed_abadi_table_pairs_the_default_with_abadi_at_that_r_seed_by_seed(utility):
    records = _records(utility, random.Random(1))  # the default and Abadi R = 3, 3 lrs x 4 seeds
    summary = utility.summarise(records)
    default = summary[("digits", "main", 3.0, "adam", 64, 40, utility.DEFAULT_METHOD)]
    abadi = summary[("digits", "main", 3.0, "adam", 64, 40, "abadi R=3")]
    diffs = [d - a for d, a in zip(default["tests"], abadi["tests"])]
    (row,) = utility.fixed_abadi_table(records, r=3.0)[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["digits", "3"] and cells[-1] == "4"
    gap, se = cells[7].split(" +- ")
    assert float(gap) == pytest.approx(statistics.fmean(diffs), abs=1e-4)
    assert float(se) == pytest.approx(statistics.stdev(diffs) / 2, abs=1e-4)  # sqrt(4 seeds)
    assert utility.fixed_abadi_table(records, r=1.0)[2:] == []  # no Abadi R = 1 run: no row


def test_psac_table_pairs_psac_with_the_abadi_r_validation_chose_and_auto_s(utility):
    rng = random.Random(2)
    records = _records(utility, rng, (AUTO_S, ABADI_3))
    assert utility.psac_table(records)[2:] == []  # no PSAC run: no row
    for i, lr in enumerate((1e-3, 2e-3, 5e-3)):
        for seed in range(4):
            cfg = utility.Config("digits", "main", 3.0, "psac", 0.1, 1.0, "adam", lr, seed, 64, 40)
            res = {
                "val": 0.6 + 0.1 * i,
                "test": 0.95 - 0.1 * i + 0.05 * rng.random(),
                "sigma": 2.0,
                "steps": 800,
            }
            records.append({"config": asdict(cfg), "result": res})
    summary = utility.summarise(records)
    table = ("digits", "main", 3.0, "adam", 64, 40)
    psac, auto_s, abadi = (summary[(*table, m)] for m in ("psac r=0.1", "auto_s g=0.01", "abadi R=3"))
    (row,) = utility.psac_table(records)[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == f"{psac['mean']:.4f}" and cells[7] == f"{abadi['mean']:.4f} (R=3)"
    for cell, other in ((cells[8], abadi), (cells[9], auto_s)):
        diffs = [p - o for p, o in zip(psac["tests"], other["tests"])]
        gap, se = cell.split(" +- ")
        assert float(gap) == pytest.approx(statistics.fmean(diffs), abs=1e-4)
        assert float(se) == pytest.approx(statistics.stdev(diffs) / 2, abs=1e-4)


def test_psac_r_table_pairs_r_1_with_r_0_1_at_their_own_lrs(utility):
    rng = random.Random(3)
    records = _records(utility, rng, (AUTO_S, ABADI_3))  # no PSAC: no row
    assert utility.psac_r_table(records)[2:] == []
    for r, shift in ((0.1, 0.0), (1.0, 0.02)):
        for i, lr in enumerate((1e-3, 2e-3, 5e-3)):
            for seed in range(4):
                cfg = utility.Config("digits", "main", 3.0, "psac", r, 1.0, "adam", lr, seed, 64, 40)
                res = {"val": 0.6 + 0.1 * i * (1 if r < 1 else -1), "test": 0.9 + shift + 0.05 * rng.random()}
                records.append({"config": asdict(cfg), "result": {**res, "sigma": 2.0, "steps": 800}})
    summary = utility.summarise(records)
    small, large = (summary[("digits", "main", 3.0, "adam", 64, 40, f"psac r={r}")] for r in ("0.1", "1"))
    assert small["lr"] == 5e-3 and large["lr"] == 1e-3  # each r at its own lr
    (row,) = utility.psac_r_table(records)[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:8] == [f"{small['mean']:.4f}", f"{large['mean']:.4f}", "-"]  # r = 3 did not run
    diffs = [a - b for a, b in zip(large["tests"], small["tests"])]
    gap, se = cells[8].split(" +- ")
    assert float(gap) == pytest.approx(statistics.fmean(diffs), abs=1e-4)
    assert float(se) == pytest.approx(statistics.stdev(diffs) / 2, abs=1e-4)
    assert cells[9] == "4"


def test_held_out_table_tunes_each_seed_on_the_other_seeds(utility):
    rng = random.Random(4)
    methods = [("psac", 1.0, 1.0), ("psac", 0.1, 1.0), ("auto_s", 0.01, 1.0), ("abadi", 0.01, 1.0)]
    methods.append(("abadi", 0.01, 3.0))
    records, runs = [], {}
    for clipping, gamma, r in methods:
        for lr in (1e-3, 5e-3):
            for seed in range(4):
                cfg = utility.Config("digits", "main", 3.0, clipping, gamma, r, "adam", lr, seed, 64, 40)
                res = {"val": rng.random(), "test": rng.random(), "sigma": 2.0, "steps": 800}
                records.append({"config": asdict(cfg), "result": res})
                runs[(cfg.method, lr, seed)] = res

    def held_out(candidates, seed):  # an independent loop: the best mean val over the other seeds
        others = [s for s in range(4) if s != seed]
        best = max(candidates, key=lambda k: sum(runs[(*k, s)]["val"] for s in others))
        return runs[(*best, seed)]["test"]

    abadi = [(m, lr) for m in ("abadi R=1", "abadi R=3") for lr in (1e-3, 5e-3)]
    (row,) = utility.held_out_table(records)[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    for cell, method in zip(cells[5:8], ("psac r=1", "psac r=0.1", "auto_s g=0.01")):
        ours = [(method, lr) for lr in (1e-3, 5e-3)]
        diffs = [held_out(ours, s) - held_out(abadi, s) for s in range(4)]
        gap, se = cell.split(" +- ")
        assert float(gap) == pytest.approx(statistics.fmean(diffs), abs=1e-4)
        assert float(se) == pytest.approx(statistics.stdev(diffs) / 2, abs=1e-4)
    assert cells[8] == "4"
    # the choice differs from the in-sample one for some seed (else the test could not tell them apart)
    in_sample = max(abadi, key=lambda k: sum(runs[(*k, s)]["val"] for s in range(4)))
    assert any(held_out(abadi, s) != runs[(*in_sample, s)]["test"] for s in range(4))


def test_paste_tables_replaces_only_the_lines_between_a_table_marker_pair(utility):
    text = "\n".join(
        [
            "intro",
            "<!-- example-command -->",
            "kept",
            "<!-- /example-command -->",
            "<!-- psac-table: replace with the PSAC table -->",
            "| stale |",
            "| stale too |",
            "<!-- /psac-table -->",
            "outro",
        ]
    )
    pasted = utility.paste_tables(text, {"psac-table": ["| new |"]})
    assert pasted.split("\n") == [
        "intro",
        "<!-- example-command -->",
        "kept",
        "<!-- /example-command -->",
        "<!-- psac-table: replace with the PSAC table -->",
        "| new |",
        "<!-- /psac-table -->",
        "outro",
    ]
    assert utility.paste_tables(pasted, {"psac-table": ["| new |"]}) == pasted


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- other-table -->\n| x |\n<!-- /other-table -->", "Unknown table marker 'other-table'"),
        ("<!-- psac-table: the table -->\n| x |\n", "no closing '<!-- /psac-table -->'"),
    ],
)
def test_paste_tables_refuses_an_unknown_or_unclosed_table(utility, text, message):
    with pytest.raises(ValueError, match=message):
        utility.paste_tables(text, {"psac-table": []})


def test_docs_quote_the_tables_of_the_committed_results(utility):
    """The docs' tables are the report's on ``utility_results.jsonl`` (``--report`` pastes them), and
    only the docs site's study page quotes them: README.md has none."""
    assert utility.DOCS == (utility.ROOT / "docs" / "studies" / "utility.md",)
    assert utility.DEFAULT_JSONL.parent == utility.ROOT / "benchmarks" / "results"
    tables = utility.doc_tables(utility.load_records(utility.DEFAULT_JSONL))
    quoted = set()
    for path in utility.DOCS:
        text = path.read_text()
        assert utility.paste_tables(text, tables) == text, f"{path.name}: run benchmarks/utility.py --report"
        quoted |= {utility._table_marker(line) for line in text.split("\n")} - {None}
    assert quoted == set(tables), "a report table the docs no longer quote"


def test_norm_study_loss_of_a_digits_example_is_its_term_of_the_training_loss(utility):
    """The norm study's per-example gradients are of the loss the digits example trains on."""
    model, data = utility.BUILDERS["digits"](utility.NORM_STUDY_RUNS["digits_eps1"])
    data.setup("fit")
    examples = [data.train_set[i] for i in range(6)]
    x = torch.stack([e[0] for e in examples])
    y = torch.stack([torch.as_tensor(e[1]) for e in examples])
    per_example = torch.stack([utility._example_loss("digits", model, e) for e in examples])
    torch.testing.assert_close(per_example.mean(), torch.nn.functional.cross_entropy(model(x), y))
    assert per_example.std() > 0


def test_optimizer_table_scores_both_optimizers_and_abadi_out_of_sample_on_the_new_seeds(utility):
    rng = random.Random(7)
    default = _package_default()
    records, runs = [], {}
    # Adam: the default and Abadi R = 1, 3 over 4 seeds; the new optimizer: the default over seeds 0-2
    for optimizer, methods, seeds in (
        ("adam", (default, ("abadi", 0.01, 1.0), ABADI_3), 4),
        ("adam_bc", (default,), 3),
    ):
        for clipping, gamma, r in methods:
            for lr in (1e-3, 5e-3):
                for seed in range(seeds):
                    cfg = utility.Config(
                        "digits", "cpu", 1.0, clipping, gamma, r, optimizer, lr, seed, 64, 40
                    )
                    res = {"val": rng.random(), "test": rng.random(), "sigma": 5.0, "steps": 800}
                    records.append({"config": asdict(cfg), "result": res})
                    runs[(optimizer, cfg.method, lr, seed)] = res

    def held_out(candidates, seed):  # an independent loop over seeds 0-2 only
        others = [s for s in range(3) if s != seed]
        best = max(candidates, key=lambda k: sum(runs[(*k, s)]["val"] for s in others))
        return runs[(*best, seed)]["test"]

    dm = utility.DEFAULT_METHOD
    new = [held_out([("adam_bc", dm, lr) for lr in (1e-3, 5e-3)], s) for s in range(3)]
    adam = [held_out([("adam", dm, lr) for lr in (1e-3, 5e-3)], s) for s in range(3)]
    abadi = [
        held_out([("adam", f"abadi R={r}", lr) for r in (1, 3) for lr in (1e-3, 5e-3)], s) for s in range(3)
    ]
    (row,) = utility.optimizer_table(records)[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:7] == [f"{statistics.fmean(v):.4f}" for v in (adam, new, abadi)]
    for cell, (a, b) in zip(cells[7:10], ((new, adam), (new, abadi), (adam, abadi))):
        diffs = [x - y for x, y in zip(a, b)]
        gap, se = cell.split(" +- ")
        assert float(gap) == pytest.approx(statistics.fmean(diffs), abs=1e-4)
        assert float(se) == pytest.approx(statistics.stdev(diffs) / math.sqrt(3), abs=1e-4)
    assert cells[10] == "3"
