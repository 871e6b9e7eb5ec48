import json
import os
import runpy
import shutil
import subprocess
import sys

import datasets
import mteb
import pytest

from colintern.cli import run
from colintern.evaluation import (
    SynthDocsRetrieval,
    evaluate,
    evaluate_in_memory,
    format_table,
    local_retrieval_task,
    resolve_benchmarks,
    results_table,
)
from colintern.evaluation.tasks import find_splits
from colintern.utils import ColinternError
from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper
from tests.conftest import REPO_ROOT
from tests.helpers import build_tiny_adapter

VIDORE_V1 = [
    "VidoreArxivQARetrieval",
    "VidoreDocVQARetrieval",
    "VidoreInfoVQARetrieval",
    "VidoreTabfquadRetrieval",
    "VidoreTatdqaRetrieval",
    "VidoreShiftProjectRetrieval",
    "VidoreSyntheticDocQAAIRetrieval",
    "VidoreSyntheticDocQAEnergyRetrieval",
    "VidoreSyntheticDocQAGovernmentReportsRetrieval",
    "VidoreSyntheticDocQAHealthcareIndustryRetrieval",
]
METRICS = ("ndcg_at_5", "ndcg_at_10", "recall_at_100")


def run_script(*args, env_updates=None):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env_updates or {})}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)


@pytest.fixture(scope="module")
def own_docs_dir(small_synthdocs_dir, tmp_path_factory):
    """A user's task folder in the flat layout (corpus/queries/qrels.parquet at the top) with a task.json."""
    folder = tmp_path_factory.mktemp("own") / "eval"
    shutil.copytree(small_synthdocs_dir / "validation", folder)
    (folder / "task.json").write_text(json.dumps({"name": "MyDocsRetrieval", "description": "my pages"}))
    return folder


def test_script_and_direct_mteb_evaluate_give_the_same_scores(tiny_adapter_dir, small_synthdocs_dir, tmp_path):
    done = run_script(
        "--model-path", str(tiny_adapter_dir), "--benchmarks", str(small_synthdocs_dir),
        "--output-dir", str(tmp_path), "--batch-size", "8", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (result_file,) = (tmp_path / "results" / "colintern__tiny-adapter").glob("*/SynthDocsRetrieval.json")
    written = json.loads(result_file.read_text())["scores"]["test"][0]
    assert all(0.0 <= written[m] <= 1.0 for m in METRICS)
    assert "| SynthDocsRetrieval " in done.stdout and f"{100 * written['ndcg_at_5']:.2f}" in done.stdout
    assert "pages/s" in done.stdout and "queries/s" in done.stdout

    task = SynthDocsRetrieval.for_folder(small_synthdocs_dir)
    direct = mteb.evaluate(ColIntern3_5Wrapper(str(tiny_adapter_dir), device="cpu"), [task], cache=None)
    scores = direct.task_results[0].scores["test"][0]
    for metric in METRICS:
        assert scores[metric] == pytest.approx(written[metric], abs=1e-9), metric


@pytest.fixture(scope="module")
def evaluated(tiny_adapter_dir, small_synthdocs_dir, own_docs_dir, tmp_path_factory):
    """One evaluation of the tiny adapter on two local tasks; tests copy its output before changing anything."""
    output_dir = tmp_path_factory.mktemp("evaluated")
    benchmarks = [str(small_synthdocs_dir), str(own_docs_dir)]
    summary = evaluate(str(tiny_adapter_dir), benchmarks, output_dir=output_dir, batch_size=8, show_progress=False)
    return benchmarks, output_dir, summary


def test_rerun_computes_only_what_is_missing(tiny_adapter_dir, evaluated, tmp_path, monkeypatch):
    benchmarks, output_dir, first = evaluated
    assert first.computed == ["SynthDocsRetrieval", "MyDocsRetrieval"]
    assert (first.results_dir / "model_meta.json").is_file()
    assert all(row.computed and row.pages_per_s > 0 and row.queries_per_s > 0 for row in first.rows)
    shutil.copytree(output_dir, tmp_path, dirs_exist_ok=True)
    results_dir = tmp_path / first.results_dir.relative_to(output_dir)
    synthdocs_file = results_dir / "SynthDocsRetrieval.json"
    stamp = synthdocs_file.stat().st_mtime_ns

    (results_dir / "MyDocsRetrieval.json").unlink()  # as if interrupted before the second task finished
    second = evaluate(str(tiny_adapter_dir), benchmarks, output_dir=tmp_path, batch_size=8, show_progress=False)
    assert second.computed == ["MyDocsRetrieval"] and second.results_dir == results_dir
    assert synthdocs_file.stat().st_mtime_ns == stamp
    assert [row.scores for row in second.rows] == [row.scores for row in first.rows]

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded when every result exists")

    monkeypatch.setattr(ColIntern3_5Wrapper, "__init__", no_model)
    third = evaluate(str(tiny_adapter_dir), benchmarks, output_dir=tmp_path, batch_size=8, show_progress=False)
    assert third.computed == [] and [row.computed for row in third.rows] == [False, False]
    assert "| MyDocsRetrieval " in third.table()


def test_changed_data_and_overwrite_recompute(tiny_adapter_dir, own_docs_dir, evaluated, tmp_path):
    _, output_dir, _ = evaluated
    shutil.copytree(output_dir, tmp_path / "res")
    folder = tmp_path / "docs"
    shutil.copytree(own_docs_dir, folder)  # same task (task.json) and data in another place: results reused
    again = evaluate(str(tiny_adapter_dir), [str(folder)], output_dir=tmp_path / "res", show_progress=False)
    assert again.computed == []
    forced = evaluate(str(tiny_adapter_dir), [str(folder)], output_dir=tmp_path / "res", overwrite=True,
                      show_progress=False)  # fmt: skip
    assert forced.computed == ["MyDocsRetrieval"]

    qrels = datasets.Dataset.from_parquet(str(folder / "qrels.parquet"))
    qrels.select(range(len(qrels) // 2)).to_parquet(str(folder / "qrels.parquet"))  # fewer judged queries
    changed = evaluate(str(tiny_adapter_dir), [str(folder)], output_dir=tmp_path / "res", show_progress=False)
    assert changed.computed == ["MyDocsRetrieval"]
    result = json.loads((changed.results_dir / "MyDocsRetrieval.json").read_text())
    assert result["dataset_revision"] == local_retrieval_task(folder).metadata.revision


def test_validation_split_and_in_memory_scores(tiny_model_dir, tiny_adapter_dir, small_synthdocs_dir, tmp_path):
    from colintern.model.loading import load_retriever

    summary = evaluate(str(tiny_adapter_dir), [str(small_synthdocs_dir)], splits=["validation"],
                       output_dir=tmp_path, show_progress=False)  # fmt: skip
    (row,) = summary.rows
    assert row.split == "validation"
    saved = json.loads((summary.results_dir / "SynthDocsRetrieval.json").read_text())["scores"]
    assert list(saved) == ["validation"]

    model, processor = load_retriever(str(tiny_adapter_dir), device="cpu")
    in_memory = evaluate_in_memory(model, processor, small_synthdocs_dir, split="validation")
    assert in_memory["ndcg_at_5"] == pytest.approx(row.scores["ndcg_at_5"], abs=1e-6)

    peft_model = build_tiny_adapter(tiny_model_dir, tmp_path / "adapter").train()  # as mid-training: unmerged
    scores = evaluate_in_memory(peft_model, processor, small_synthdocs_dir, split="validation")
    assert 0.0 <= scores["ndcg_at_5"] <= 1.0 and "recall_at_100" in scores
    assert peft_model.training  # the caller's mode is restored


def test_untrained_base_is_refused_and_allowed_as_a_baseline(tiny_model_dir, small_synthdocs_dir, tmp_path):
    with pytest.raises(ColinternError, match="base model"):
        evaluate(str(tiny_model_dir), [str(small_synthdocs_dir)], output_dir=tmp_path, show_progress=False)
    baseline = evaluate(str(tiny_model_dir), [str(small_synthdocs_dir)], output_dir=tmp_path, show_progress=False,
                        allow_untrained_head=True, max_num_visual_tokens=16)  # fmt: skip
    assert baseline.computed == ["SynthDocsRetrieval"] and 0.0 <= baseline.score("SynthDocsRetrieval") <= 1.0


def test_synthdocs_by_name_is_the_embedded_test_split():
    (selection,) = resolve_benchmarks(["SynthDocsRetrieval"])
    (task,) = selection.tasks
    assert isinstance(task, SynthDocsRetrieval) and not selection.is_benchmark
    assert task.metadata.dataset["path"] == "embedded:synthdocs" and list(task.eval_splits) == ["test"]
    assert task.metadata.main_score == "ndcg_at_5" and task.metadata.category == "t2i"


def test_vidore_v1_resolves_to_its_10_tasks():
    (selection,) = resolve_benchmarks(["ViDoRe(v1)"])
    assert selection.label == "ViDoRe(v1)" and selection.is_benchmark
    assert [task.metadata.name for task in selection.tasks] == VIDORE_V1
    assert {task.metadata.main_score for task in selection.tasks} == {"ndcg_at_5"}


def test_vidore_v1_offline_stops_with_one_line_naming_the_dataset(tiny_adapter_dir, tmp_path, monkeypatch, capsys):
    import datasets.config

    script = runpy.run_path(str(REPO_ROOT / "scripts" / "evaluate.py"), run_name="evaluate_script")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # an empty datasets cache
    for extra in ([], ["--download-only"]):
        argv = ["--model-path", str(tiny_adapter_dir), "--benchmarks", "ViDoRe(v1)", "--output-dir", str(tmp_path)]
        assert run(script["main"], script["build_parser"](), argv + extra) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1
        assert errors[0].startswith("error: dataset mteb/arxivqa_test_subsampled_beir (task VidoreArxivQARetrieval)")
        assert "not available offline" in errors[0] and "--download-only" in errors[0]
    assert not list(tmp_path.glob("results/*/*/*.json"))


def test_unreachable_hub_without_offline_flag_fails_at_once(tiny_adapter_dir, tmp_path, monkeypatch):
    import datasets.config

    from colintern import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    hub.hub_reachable.cache_clear()
    try:
        with pytest.raises(ColinternError, match=r"dataset vidore/\S+ \(task Vidore2ESGReportsRetrieval\)"):
            evaluate(str(tiny_adapter_dir), ["Vidore2ESGReportsRetrieval"], output_dir=tmp_path, show_progress=False)
    finally:
        hub.hub_reachable.cache_clear()
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # switched to offline mode instead of retrying


def test_unknown_names_and_bad_folders(tmp_path, small_synthdocs_dir):
    with pytest.raises(ColinternError, match=r"'ViDoRe\(v9\)' is not an mteb benchmark.*Did you mean: ViDoRe"):
        resolve_benchmarks(["ViDoRe(v9)"])
    with pytest.raises(ColinternError, match="no such folder"):
        resolve_benchmarks(["./no/such/folder"])
    for name in ("SynthDocsRetrieval", str(small_synthdocs_dir), "VidoreDocVQARetrieval"):
        with pytest.raises(ColinternError, match="has no train2 split"):
            resolve_benchmarks([name], splits=["train2"])

    folder = tmp_path / "bad"
    shutil.copytree(small_synthdocs_dir / "test", folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ColinternError, match="not a retrieval task folder"):
        find_splits(tmp_path / "empty")
    corpus = datasets.Dataset.from_parquet(str(folder / "corpus.parquet"))
    corpus.rename_column("image", "picture").to_parquet(str(folder / "corpus.parquet"))
    with pytest.raises(ColinternError, match=r"corpus.parquet lacks the column\(s\) image"):
        local_retrieval_task(folder).load_data()
    shutil.copy(small_synthdocs_dir / "test" / "corpus.parquet", folder / "corpus.parquet")
    qrels = datasets.Dataset.from_dict({"query-id": ["q-nope"], "corpus-id": ["d-nope"], "score": [1]})
    qrels.to_parquet(str(folder / "qrels.parquet"))
    with pytest.raises(ColinternError, match="qrels.parquet names 'q-nope'"):
        local_retrieval_task(folder).load_data()


def test_results_table_shows_missing_tasks_as_missing(evaluated):
    _, _, summary = evaluated
    suite = [("My suite", ["SynthDocsRetrieval", "MissingRetrieval"])]
    rows, averages = results_table(summary.results_dir, suite)
    assert [row.task for row in rows] == ["SynthDocsRetrieval"]
    (average,) = averages
    assert (average.n_tasks, average.n_total) == (1, 2) and average.scores == rows[0].scores
    table = format_table(rows, averages)
    assert "My suite average**, 1 of 2 tasks" in table and "MissingRetrieval" not in table
    assert f"{100 * rows[0].scores['recall_at_100']:.2f}" in table
    every_file, _ = results_table(summary.results_dir.parent)  # the model folder; default: every task file
    assert sorted(row.task for row in every_file) == ["MyDocsRetrieval", "SynthDocsRetrieval"]
    assert every_file[0].as_dict()["ndcg_at_5"] == every_file[0].scores["ndcg_at_5"]


def test_one_task_name_with_two_datasets_is_an_error(tiny_adapter_dir, small_synthdocs_dir, tmp_path):
    with pytest.raises(ColinternError, match="are both task SynthDocsRetrieval, with different data"):
        evaluate(str(tiny_adapter_dir), ["SynthDocsRetrieval", str(small_synthdocs_dir)], output_dir=tmp_path)
    named = tmp_path / "named"
    shutil.copytree(small_synthdocs_dir, named)
    (named / "task.json").write_text(json.dumps({"name": "SmallSynthDocs"}))
    selections = resolve_benchmarks(["SynthDocsRetrieval", str(named)])
    assert [s.tasks[0].metadata.name for s in selections] == ["SynthDocsRetrieval", "SmallSynthDocs"]


def test_a_task_json_name_cannot_make_a_result_file_outside_the_output_folder(tiny_adapter_dir, own_docs_dir,
                                                                             tmp_path):
    # found: {"name": "../../../../../x"} in a shared task folder made evaluate.py write /tmp/x.json
    folder = tmp_path / "shared" / "task"
    shutil.copytree(own_docs_dir, folder)
    (folder / "task.json").write_text(json.dumps({"name": "../../../../../x", "description": "hostile"}))
    output_dir = tmp_path / "a" / "b" / "c" / "results-cache"
    summary = evaluate(str(tiny_adapter_dir), [str(folder)], output_dir=output_dir, batch_size=8, show_progress=False)
    written = [p for p in tmp_path.rglob("*.json") if not p.is_relative_to(folder)]
    assert written and all(p.is_relative_to(output_dir) for p in written), written
    assert (summary.results_dir / "x.json").is_file() and summary.rows[0].task == "x"
    for hostile, expected in (("..", "LocalRetrieval"), ("a/b", "a-b"), (".hidden", "hidden"), ("x" * 300, None)):
        (folder / "task.json").write_text(json.dumps({"name": hostile}))
        name = local_retrieval_task(folder).metadata.name
        assert "/" not in name and not name.startswith(".") and len(name) <= 120
        assert name == expected or expected is None
    (folder / "task.json").write_text("[1, 2]")
    with pytest.raises(ColinternError, match="must hold a JSON object"):
        local_retrieval_task(folder)
