"""Confidence intervals and paired tests in compare_models: on two real demo-sized evaluations (the pretrained tiny
retriever and the untrained tiny base on a small SynthDocs, evaluated by colintern.evaluation.evaluate through
mteb), and on ViDoRe(v1)-shaped results whose per-query scores are known exactly (the benchmark-mean path)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mteb
import numpy as np
import pytest

from colintern.mteb_results import PER_QUERY_DIR, per_query_path, read_per_query, read_task_result
from colintern.reports.compare import build_comparison, compare_models
from colintern.reports.intervals import Interval, bootstrap, paired_bootstrap, strata, verdict
from colintern.reports.results import find_task_result_files, load_result_folder
from tests.mteb_results import write_results

REPO_ROOT = Path(__file__).resolve().parents[2]
V1 = [t.metadata.name for t in mteb.get_benchmark("ViDoRe(v1)").tasks]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, colintern_home, small_synthdocs_dir):
    """Two real evaluations on the same small SynthDocs test split, each in its own results folder."""
    from colintern.evaluation import evaluate

    root = tmp_path_factory.mktemp("runs")
    trained = evaluate("embedded:tiny-internvl3_5-pretrained", [str(small_synthdocs_dir)], output_dir=root / "trained",
                       batch_size=8, show_progress=False)
    base = evaluate("embedded:tiny-internvl3_5", [str(small_synthdocs_dir)], output_dir=root / "base", batch_size=8,
                    show_progress=False, allow_untrained_head=True, max_num_visual_tokens=16)
    return {"root": root, "trained": trained, "base": base}


def test_evaluation_keeps_mteb_per_query_scores_beside_its_files(demo_runs):
    summary = demo_runs["trained"]
    (task,) = [row.task for row in summary.rows]
    path = per_query_path(summary.results_dir, task)
    assert path.parent.name == PER_QUERY_DIR and path.parent.parent == summary.results_dir
    per_query = read_per_query(summary.results_dir, task)
    queries = per_query["test"]["default"]
    assert len(queries) == 24  # the small SynthDocs test split
    for metric in ("ndcg_at_5", "ndcg_at_10"):  # mteb's score is the mean of these values
        mean = sum(q[metric] for q in queries.values()) / len(queries)
        assert mean == pytest.approx(summary.score(task, metric), abs=1e-5)
    # neither mteb's own loader nor colintern's reader takes the file for a task result
    cache = mteb.ResultCache(demo_runs["root"] / "trained")
    assert all(p.parent.name != PER_QUERY_DIR for p in cache.get_cache_paths(include_remote=False))
    assert [p.name for p in find_task_result_files(demo_runs["root"] / "trained")] == [f"{task}.json"]


def test_compare_prints_intervals_and_the_paired_result_of_two_runs(demo_runs):
    comparison = compare_models([str(demo_runs["trained"].results_dir), str(demo_runs["base"].results_dir)],
                                leaderboard_dir=REPO_ROOT / "colintern" / "reports" / "references")
    trained, base = comparison.result_sets
    group = comparison.groups[0]
    intervals, _ = comparison.intervals(trained, group)
    (task, interval), = intervals.items()
    assert interval.estimate == pytest.approx(comparison.score(trained, task), abs=1e-5)
    assert interval.low < interval.estimate < interval.high and interval.n_queries == 24
    paired, _ = comparison.paired(trained, base, group)
    difference = comparison.score(trained, task) - comparison.score(base, task)
    assert paired[task].estimate == pytest.approx(difference, abs=1e-5)
    assert paired[task].low > 0  # 0.93 against 0.16 NDCG@5 on 24 queries: clearly apart
    text = comparison.to_text()
    assert "95% bootstrap intervals (NDCG@5 x100" in text
    assert f"{trained.label} beats {base.label} on {task}: +{100 * difference:.2f}, 95% CI [" in text
    # a run against itself: a difference of exactly zero, not significant
    same, _ = paired_bootstrap({task: trained.per_query[task]}, {task: trained.per_query[task]}, "ndcg_at_5")
    assert (same[task].estimate, same[task].low, same[task].high) == (0.0, 0.0, 0.0)
    assert verdict("A", "B", task, same[task]).startswith(f"no significant difference between A and B on {task}")


def test_compare_script_with_two_runs(demo_runs, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "scripts" / "compare_models.py"), "base", "trained",
               "--evaluation-root", str(tmp_path), "--bootstrap", "500", "--markdown", str(tmp_path / "t.md")]
    command[2:4] = [str(demo_runs["base"].results_dir), str(demo_runs["trained"].results_dir)]
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "500 draws" in out.stdout and " beats " in out.stdout and "95% CI [" in out.stdout
    assert "Paired bootstrap" in (tmp_path / "t.md").read_text()
    bad = subprocess.run(command[:4] + ["--bootstrap", "-1"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --bootstrap must be 0")


def test_a_stale_per_query_file_is_ignored(demo_runs, tmp_path, caplog):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(demo_runs["base"].results_dir, folder)
    (task,) = [row.task for row in demo_runs["base"].rows]
    data = json.loads(per_query_path(folder, task).read_text())
    for values in data["scores"]["test"]["default"].values():
        values[0] = 1.0  # no longer what mteb averaged
    per_query_path(folder, task).write_text(json.dumps(data))
    assert read_per_query(folder, task) is None and "stale per-query scores" in caplog.text
    (result_set,) = load_result_folder(folder)
    assert result_set.per_query == {}


# ------------------------------------------------------------------------------ exact data: the benchmark mean


def write_known_run(root: Path, model: str, hits: int, n: int = 100) -> Path:
    """ViDoRe(v1) results (tests.mteb_results: the first `hits` of `n` queries find their page first, NDCG@5 = 1,
    the others 6th, NDCG@5 = 0) and the matching per-query file."""
    folder = write_results(root, model, "r1", {task: hits / n for task in V1})
    for task in V1:
        result = read_task_result(folder / f"{task}.json")
        ndcg10 = {k: v for k, v in result.scores["test"][0].items() if k == "ndcg_at_10"}["ndcg_at_10"]
        miss10 = (ndcg10 - hits / n) / (1 - hits / n)  # the 6th place's NDCG@10 (1/log2(7))
        queries = {f"q{i}": [1.0, 1.0] if i < hits else [0.0, round(miss10, 6)] for i in range(n)}
        record = {"format": "colintern-per-query/1", "task": task, "metrics": ["ndcg_at_5", "ndcg_at_10"],
                  "scores": {"test": {"default": queries}}}
        per_query_path(folder, task).parent.mkdir(exist_ok=True)
        per_query_path(folder, task).write_text(json.dumps(record))
    return folder


def test_benchmark_mean_interval_and_paired_test_on_known_scores(tmp_path):
    (x,) = load_result_folder(write_known_run(tmp_path / "x", "me/x", hits=80), label="X")
    (y,) = load_result_folder(write_known_run(tmp_path / "y", "me/y", hits=70), label="Y")
    assert len(x.per_query) == 10
    comparison = build_comparison([x, y], "ndcg_at_5")
    comparison.draws = 2000
    group = comparison.groups[0]
    assert group.name == "ViDoRe(v1)"
    per_task, mean = comparison.intervals(x, group)
    assert mean.estimate == pytest.approx(0.80) and mean.n_tasks == 10 and mean.n_queries == 1000
    binomial = 1.96 * math.sqrt(0.8 * 0.2 / 100)  # the normal approximation of a task's 95% interval
    assert per_task[V1[0]].high - per_task[V1[0]].low == pytest.approx(2 * binomial, rel=0.2)
    assert mean.high - mean.low == pytest.approx(2 * binomial / math.sqrt(10), rel=0.2)
    _, paired_mean = comparison.paired(x, y, group)
    # X finds 10 more pages per task: a difference of 0.10 on 10 of 100 queries, 0 elsewhere
    assert paired_mean.estimate == pytest.approx(0.10)
    spread = 1.96 * math.sqrt(0.1 * 0.9 / 100) / math.sqrt(10)
    assert paired_mean.low == pytest.approx(0.10 - spread, abs=0.01) and paired_mean.high == pytest.approx(
        0.10 + spread, abs=0.01)
    line = verdict("X", "Y", "ViDoRe(v1)", paired_mean)
    assert line.startswith("X beats Y on ViDoRe(v1): +10.00, 95% CI [") and "(1000 paired queries, 10 tasks)" in line
    assert verdict("Y", "X", "ViDoRe(v1)", Interval(-0.1, -0.12, -0.08, 5)).startswith(
        "X beats Y on ViDoRe(v1): +10.00, 95% CI [8.00, 12.00]")
    # NDCG@10 comes from the same files; a metric without per-query scores gives no intervals
    comparison.metric = "ndcg_at_10"
    assert comparison.intervals(x, group)[1].estimate == pytest.approx(comparison.average(x, group).mean, abs=1e-5)
    comparison.metric = "recall_at_100"
    assert comparison.intervals(x, group) == ({}, None)
    assert comparison.interval_lines() == [
        "No confidence intervals for Recall@100: per-query scores are kept for NDCG@5, NDCG@10 (--metric)."]


def test_bootstrap_is_reproducible_and_stratified():
    rng = np.random.default_rng(1)
    per_query = {"test": {lang: {f"q{i}": {"ndcg_at_5": float(v)} for i, v in enumerate(rng.random(n))}
                          for lang, n in (("english", 50), ("french", 10))}}
    values = strata(per_query, "ndcg_at_5")
    first, mean = bootstrap({"T": values}, draws=300, seed=3)
    again, _ = bootstrap({"T": values}, draws=300, seed=3)
    assert first == again and mean.n_tasks == 1
    # mteb's score: the mean of the two languages' means, not of the 60 queries
    expected = np.mean([np.mean([q["ndcg_at_5"] for q in rows.values()]) for rows in per_query["test"].values()])
    assert first["T"].estimate == pytest.approx(expected)
    assert strata(per_query, "ndcg_at_10") == {}
