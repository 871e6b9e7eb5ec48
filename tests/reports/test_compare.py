"""Model comparison and reference scores, on real mteb result files (written by mteb's own ResultCache and
TaskResult, one of them by a whole mteb.evaluate run) and a fake clone of the public results repository laid out
like the real one."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import mteb
import pytest

from colintern.cli import run
from colintern.reports.compare import build_comparison, compare_models
from colintern.reports.leaderboard import collect_reference_scores, write_reference_files
from colintern.reports.results import (
    DEFAULT_LEADERBOARD_DIR,
    load_reference_models,
    load_result_folder,
    normalize_metric,
    resolve_result_sets,
)
from colintern.utils import OUTPUT_RECORD, ColinternError
from tests.mteb_results import evaluate_local_task, scored_task_result, write_results

REPO_ROOT = Path(__file__).resolve().parents[2]
V1 = list(mteb.get_benchmark("ViDoRe(v1)").tasks)
V1_NAMES = [t.metadata.name for t in V1]
COLPALI_REVISION = mteb.get_model_meta("vidore/colpali-v1.3").revision

# The published colpali-v1.3 NDCG@5 per ViDoRe(v1) task (FIELD_NOTES, public mteb results at commit f4cc6c8).
PUBLISHED_COLPALI_V1 = {
    "VidoreArxivQARetrieval": 83.25,
    "VidoreDocVQARetrieval": 58.37,
    "VidoreInfoVQARetrieval": 85.53,
    "VidoreTabfquadRetrieval": 86.75,
    "VidoreTatdqaRetrieval": 70.78,
    "VidoreShiftProjectRetrieval": 77.29,
    "VidoreSyntheticDocQAAIRetrieval": 97.43,
    "VidoreSyntheticDocQAEnergyRetrieval": 94.65,
    "VidoreSyntheticDocQAGovernmentReportsRetrieval": 96.08,
    "VidoreSyntheticDocQAHealthcareIndustryRetrieval": 97.41,
}
PUBLISHED_AVERAGES = {  # model: (ViDoRe(v1), ViDoRe(v2)) NDCG@5 x100
    "vidore/colpali-v1.3": (84.75, 54.72),
    "vidore/colqwen2-v1.0": (89.23, 56.04),
    "vidore/colqwen2.5-v0.2": (89.54, 60.06),
    "vidore/colSmol-256M": (79.74, 34.82),
    "vidore/colSmol-500M": (82.49, 42.89),
    "nomic-ai/colnomic-embed-multimodal-3b": (89.86, 55.68),
    "nomic-ai/colnomic-embed-multimodal-7b": (89.72, 60.25),
    "jinaai/jina-embeddings-v4": (90.35, 58.23),
    "nvidia/llama-nemoretriever-colembed-1b-v1": (90.50, 62.96),
    "nvidia/llama-nemoretriever-colembed-3b-v1": (91.00, 63.32),
    "nvidia/nemotron-colembed-vl-8b-v2": (92.65, 65.16),
}

# My model: 3 of the 10 ViDoRe(v1) tasks and 1 of the 4 ViDoRe(v2) tasks.
MINE = {
    "VidoreArxivQARetrieval": 0.70,
    "VidoreDocVQARetrieval": 0.40,
    "VidoreTabfquadRetrieval": 0.90,
    "Vidore2ESGReportsRetrieval": {"english": 0.60, "french": 0.50, "spanish": 0.40, "german": 0.30},
}
FAKE_COLPALI = {name: round(value / 100, 2) for name, value in PUBLISHED_COLPALI_V1.items()}
FAKE_COLQWEN = {name: min(1.0, round(value / 100 + 0.05, 2)) for name, value in PUBLISHED_COLPALI_V1.items()}


def write_clone_model(clone: Path, model: str, revision: str, scores: dict) -> None:
    """results/{org__model}/{revision}/{Task}.json + model_meta.json, as in embeddings-benchmark/results."""
    folder = clone / "results" / model.replace("/", "__") / revision
    folder.mkdir(parents=True, exist_ok=True)
    meta = mteb.get_model_meta(model).model_copy(update={"revision": revision})
    (folder / "model_meta.json").write_text(json.dumps(meta.to_dict(), default=str))
    for task, value in scores.items():
        scored_task_result(task, value).to_disk(folder / f"{task}.json")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    # A fake clone of the public results repository: colpali with two revisions (the registered one has most
    # tasks, the other adds a v2 task and disagrees on one v1 task), colqwen2 with one.
    clone = root / "mteb-results"
    write_clone_model(clone, "vidore/colpali-v1.3", COLPALI_REVISION, FAKE_COLPALI)
    write_clone_model(clone, "vidore/colpali-v1.3", "0" * 40,
                      {"VidoreArxivQARetrieval": 0.11, "Vidore2ESGReportsHLRetrieval": 0.58})
    write_clone_model(clone, "vidore/colqwen2-v1.0", "1" * 40, FAKE_COLQWEN)
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "results"], check=True)
    commit = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    leaderboard = root / "leaderboard"
    write_reference_files(collect_reference_scores(clone), leaderboard)

    evaluation_root = root / "results" / "mteb_evaluation"
    write_results(evaluation_root, "me/colintern3_5-1b", "r1", MINE)
    write_results(evaluation_root, "me/colintern3_5-1b-lr2e-5", "r1", {"VidoreArxivQARetrieval": 0.75})

    # A training run folder as `make demo` leaves it: checkpoints and configs next to a real mteb.evaluate result.
    demo = root / "experiments" / "demo"
    (demo / "checkpoint-20").mkdir(parents=True)
    (demo / "checkpoint-20" / "adapter_config.json").write_text(json.dumps({"r": 8, "task_type": "FEATURE_EXTRACTION"}))
    (demo / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": []}))
    evaluate_local_task(demo / "eval")
    return {"root": root, "clone": clone, "commit": commit, "leaderboard": leaderboard,
            "evaluation_root": evaluation_root, "demo": demo}


def compare(workspace, names, **kwargs):
    return compare_models(names, evaluation_root=workspace["evaluation_root"],
                          leaderboard_dir=workspace["leaderboard"], **kwargs)


# ------------------------------------------------------------------------------------------------- reference files


def test_update_leaderboard_reads_the_clone_with_sources(workspace):
    colpali = json.loads((workspace["leaderboard"] / "vidore__colpali-v1.3.json").read_text())
    assert colpali["source"] == {"repository": "https://github.com/embeddings-benchmark/results",
                                 "commit": workspace["commit"]}
    arxiv = colpali["tasks"]["VidoreArxivQARetrieval"]
    assert arxiv["scores"]["ndcg_at_5"] == pytest.approx(0.83)  # the registered revision wins over the other
    assert arxiv["revision"] == COLPALI_REVISION and arxiv["mteb_version"] == mteb.__version__
    assert arxiv["path"] == f"results/vidore__colpali-v1.3/{COLPALI_REVISION}/VidoreArxivQARetrieval.json"
    assert {"ndcg_at_10", "recall_at_100", "map_at_5", "mrr_at_10"} <= set(arxiv["scores"])
    hl = colpali["tasks"]["Vidore2ESGReportsHLRetrieval"]  # only in the other revision: taken from there
    assert hl["revision"] == "0" * 40 and hl["scores"]["ndcg_at_5"] == pytest.approx(0.58)
    v1 = colpali["benchmarks"]["ViDoRe(v1)"]
    assert (v1["n_tasks"], v1["of"]) == (10, 10)
    assert v1["ndcg_at_5_mean"] == pytest.approx(sum(FAKE_COLPALI.values()) / 10, abs=1e-6)
    assert colpali["benchmarks"]["ViDoRe(v2)"]["n_tasks"] == 1
    readme = (workspace["leaderboard"] / "README.md").read_text()
    assert "vidore/colqwen2-v1.0" in readme and workspace["commit"][:7] in readme


def test_update_leaderboard_replaces_only_its_own_files(workspace, tmp_path):
    records = collect_reference_scores(workspace["clone"])
    write_reference_files(records, workspace["leaderboard"])  # an update of its own folder
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "README.md").write_text("the user's README")
    with pytest.raises(ColinternError, match=r"docs/README.md was not written by update_leaderboard"):
        write_reference_files(records, folder)
    assert [p.name for p in folder.iterdir()] == ["README.md"]
    assert (folder / "README.md").read_text() == "the user's README"
    with pytest.raises(ColinternError, match=r"lies inside the input --results-repo"):
        write_reference_files(records, workspace["clone"] / "results", inputs={"--results-repo": workspace["clone"]})
    shipped = json.loads((DEFAULT_LEADERBOARD_DIR / OUTPUT_RECORD).read_text())["written_by"]["update_leaderboard"]
    assert sorted(p.name for p in DEFAULT_LEADERBOARD_DIR.iterdir() if p.name != OUTPUT_RECORD) == shipped


def test_update_leaderboard_refuses_a_folder_that_is_no_clone(tmp_path):
    with pytest.raises(ColinternError, match="git clone --depth 1 https://github.com/embeddings-benchmark/results"):
        collect_reference_scores(tmp_path)


def test_the_shipped_reference_scores_match_the_published_figures():
    references = {r.model_name: r for r in load_reference_models(DEFAULT_LEADERBOARD_DIR)}
    assert set(PUBLISHED_AVERAGES) <= set(references)
    for model, (v1, v2) in PUBLISHED_AVERAGES.items():
        record = json.loads(Path(references[model].origin).read_text())
        assert round(100 * record["benchmarks"]["ViDoRe(v1)"]["ndcg_at_5_mean"], 2) == v1, model
        assert round(100 * record["benchmarks"]["ViDoRe(v2)"]["ndcg_at_5_mean"], 2) == v2, model
        assert record["source"]["commit"].startswith("f4cc6c8")
        assert all(task["mteb_version"] and task["path"].startswith("results/") for task in record["tasks"].values())
    colpali = references["vidore/colpali-v1.3"]
    for task, value in PUBLISHED_COLPALI_V1.items():
        assert round(100 * colpali.score(task, "ndcg_at_5"), 2) == value, task


# ---------------------------------------------------------------------------------------------------- comparison


def test_partial_results_are_missing_never_zero(workspace):
    comparison = compare(workspace, ["colintern3_5-1b", "colpali-v1.3"], benchmarks=["ViDoRe(v1)", "ViDoRe(v2)"])
    mine, colpali = comparison.result_sets
    v1, v2 = comparison.groups
    assert v1.tasks == V1_NAMES  # the union of both models' tasks, in mteb's order
    assert comparison.score(mine, "VidoreInfoVQARetrieval") is None
    average = comparison.average(mine, v1)
    assert (average.n_tasks, average.of) == (3, 10)
    assert average.mean == pytest.approx((0.70 + 0.40 + 0.90) / 3)
    assert comparison.average(mine, v2).mean == pytest.approx(0.45)  # mean of the 4 language subsets, as mteb
    # Ranked on the 3 tasks it has: colpali there = (0.83 + 0.58 + 0.87) / 3 = 0.76 > 0.667, colqwen2 higher still.
    rank = comparison.rank(mine, v1)
    assert (rank.position, rank.of, rank.n_tasks) == (3, 3, 3)
    text = comparison.to_text()
    info_row = next(line for line in text.splitlines() if "VidoreInfoVQARetrieval" in line)
    assert info_row.split()[1] == "—" and "0.00" not in info_row
    assert re.search(r"average \(tasks covered\)\s+66\.67 \(3/10\)\s+\d+\.\d+ \(10/10\)", text)
    # deltas only on the tasks both have
    assert comparison.delta(colpali, "VidoreArxivQARetrieval") == pytest.approx(0.83 - 0.70)
    assert comparison.delta(colpali, "VidoreInfoVQARetrieval") is None
    assert comparison.average_delta(colpali, v1) == (pytest.approx((0.13 + 0.18 - 0.03) / 3), 3)


def test_names_resolve_to_folders_evaluations_and_references(workspace):
    refs = load_reference_models(workspace["leaderboard"])
    root = workspace["evaluation_root"]
    for name in ("colintern3_5-1b", "me/colintern3_5-1b", "me__colintern3_5-1b"):
        (rs,) = resolve_result_sets([name], root, references=refs)
        assert rs.model_name == "me/colintern3_5-1b" and not rs.is_reference
    (rs,) = resolve_result_sets(["leaderboard:colpali-v1.3"], root, references=refs)
    assert rs.is_reference and rs.model_name == "vidore/colpali-v1.3"
    (rs,) = resolve_result_sets(["colqwen2"], root, references=refs)  # a unique prefix of a reference's name
    assert rs.model_name == "vidore/colqwen2-v1.0"
    with pytest.raises(ColinternError, match="ambiguous"):
        resolve_result_sets(["col"], root, references=refs)
    # a cache root holds several models: one column each
    labels = [rs.label for rs in resolve_result_sets([str(root)], root, references=refs)]
    assert labels == ["me/colintern3_5-1b", "me/colintern3_5-1b-lr2e-5"]


def test_unknown_names_get_close_matches(workspace):
    with pytest.raises(ColinternError) as error:
        compare(workspace, ["colintern3_5-1b", "colpali-v13"])
    message = str(error.value)
    assert "no results for 'colpali-v13'" in message and "Close matches: vidore/colpali-v1.3" in message
    with pytest.raises(ColinternError, match="Close matches: me/colintern3_5-1b"):
        compare(workspace, ["colintern3_5-1bb"])


def test_the_demo_folder_holds_a_real_mteb_evaluate_result(workspace):
    comparison = compare(workspace, [str(workspace["demo"]), "colpali-v1.3"])
    demo, colpali = comparison.result_sets
    assert demo.model_name == "mteb/baseline-random-encoder" and list(demo.tasks) == ["SynthDocsRetrieval"]
    assert [g.name for g in comparison.groups] == ["ViDoRe(v1)", "ViDoRe(v2)", "Other tasks"]
    other = comparison.groups[-1]
    assert other.size is None and other.tasks == ["SynthDocsRetrieval"]
    assert 0 <= comparison.score(demo, "SynthDocsRetrieval") <= 1
    assert comparison.score(colpali, "SynthDocsRetrieval") is None
    assert comparison.average_delta(colpali, comparison.groups[0]) == (None, 0)
    assert "mean delta (common tasks)" in comparison.to_text()


def test_metrics_and_baseline(workspace):
    assert normalize_metric("NDCG@10") == "ndcg_at_10" and normalize_metric("recall100") == "recall_at_100"
    comparison = compare(workspace, ["colintern3_5-1b", "colpali-v1.3"], metric="Recall@100", baseline="colpali-v1.3")
    assert comparison.metric == "recall_at_100" and comparison.baseline.model_name == "vidore/colpali-v1.3"
    assert "Recall@100 (x100)" in comparison.to_text()
    assert compare(workspace, ["colintern3_5-1b"], metric="main_score").score(
        compare(workspace, ["colintern3_5-1b"]).result_sets[0], "VidoreArxivQARetrieval") == pytest.approx(0.70)
    with pytest.raises(ColinternError, match="Close matches: .*ndcg_at_5"):
        compare(workspace, ["colintern3_5-1b"], metric="ndgc_at_5")
    with pytest.raises(ColinternError, match="baseline 'nope'"):
        compare(workspace, ["colintern3_5-1b"], baseline="nope")


def test_markdown_table_is_well_formed(workspace):
    markdown = compare(workspace, ["colintern3_5-1b", "colpali-v1.3"], benchmarks=["ViDoRe(v1)"]).to_markdown()
    tables = [[line for line in block.splitlines() if line.startswith("|")] for block in markdown.split("\n\n")]
    scores, deltas = [table for table in tables if table]
    assert scores[0] == "| task | me/colintern3_5-1b | vidore/colpali-v1.3 |"
    assert scores[1] == "|---|---:|---:|"
    assert all(line.count("|") == 4 for line in scores)
    assert deltas[0] == "| task | vidore/colpali-v1.3 |" and all(line.count("|") == 3 for line in deltas)
    assert "| VidoreInfoVQARetrieval | — | 85.53 |" not in markdown  # the leaderboard here is the fake clone's
    assert "| VidoreInfoVQARetrieval | — | 86.00 |" in markdown
    assert "| average (tasks covered) | 66.67 (3/10) | " in markdown


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_is_a_png_of_sensible_size(workspace, tmp_path):
    comparison = compare(workspace, ["colintern3_5-1b", "colpali-v1.3", "colqwen2", str(workspace["demo"])])
    path = comparison.plot(tmp_path / "plots" / "comparison.png")
    width, height = _png_size(path)
    assert 800 <= width <= 4000 and 600 <= height <= 4000
    assert path.stat().st_size > 30_000
    assert not list(path.parent.glob(".*tmp*"))


def test_a_broken_result_file_is_named(tmp_path):
    folder = tmp_path / "results" / "me__m" / "r"
    folder.mkdir(parents=True)
    (folder / "VidoreArxivQARetrieval.json").write_text('{"task_name": "VidoreArxivQARetrieval", "scores": 3}')
    with pytest.raises(ColinternError, match="VidoreArxivQARetrieval.json is not a readable mteb result file"):
        load_result_folder(tmp_path)
    with pytest.raises(ColinternError, match="no mteb result files under"):
        load_result_folder(tmp_path / "results" / "empty")


def test_build_comparison_from_result_sets_in_python(workspace):
    sets = load_result_folder(workspace["evaluation_root"])
    comparison = build_comparison(sets, "ndcg_at_5", baseline="2")
    assert comparison.baseline.model_name == "me/colintern3_5-1b-lr2e-5"
    assert comparison.delta(sets[0], "VidoreArxivQARetrieval") == pytest.approx(-0.05)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_script_end_to_end(workspace, tmp_path, capsys, monkeypatch):
    """`python scripts/compare_models.py experiments/demo colpali-v1.3` from a project folder, then an unknown name."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "compare_models.py"), "experiments/demo", "colintern3_5-1b",
               "colpali-v1.3", "--leaderboard-dir", str(workspace["leaderboard"]), "--plot", str(tmp_path / "c.png"),
               "--markdown", str(tmp_path / "c.md")]
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(command, cwd=workspace["root"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "NDCG@5 (x100)" in out.stdout and "SynthDocsRetrieval" in out.stdout
    assert "Delta to the baseline experiments/demo" in out.stdout
    assert (tmp_path / "c.png").exists() and (tmp_path / "c.md").read_text().startswith("**NDCG@5**")
    # the same front end in-process: an unknown name is one `error:` line and exit status 2
    script = load_script("compare_models")
    monkeypatch.chdir(workspace["root"])
    argv = ["colpali-v13", "--leaderboard-dir", str(workspace["leaderboard"])]
    status = run(script.main, script.build_parser(), argv)
    stderr = capsys.readouterr().err
    assert status == 2 and stderr.startswith("error: no results for 'colpali-v13'") and stderr.count("\n") == 1
    assert "vidore/colpali-v1.3" in stderr
