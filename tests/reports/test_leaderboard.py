"""The reference refresh (scripts/update_leaderboard.py) on a fake results repository laid out like the real one,
read from a clone and from a bare snapshot; and the provenance check of the shipped reference files against the real
repository (skipped, saying why, when no snapshot of it is on this machine)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mteb
import pytest

from colintern.mteb_results import read_task_result, task_scores
from colintern.reports.compare import build_comparison
from colintern.reports.leaderboard import (
    REFERENCE_MODELS,
    benchmark_ranks,
    collect_reference_scores,
    leaderboard_markdown,
    write_reference_files,
)
from colintern.reports.results import DEFAULT_LEADERBOARD_DIR, load_reference_models
from colintern.utils import ColinternError
from tests.mteb_results import scored_task_result, write_results

V3 = [t.metadata.name for t in mteb.get_benchmark("ViDoRe(v3)").tasks]
V3_1 = [t.metadata.name for t in mteb.get_benchmark("ViDoRe(v3.1)").tasks]
LANGS = sorted(mteb.get_task(V3[0]).hf_subsets)  # the six languages of a ViDoRe(v3) task
JINA = "jinaai/jina-embeddings-v4"
JINA_REVISION = mteb.get_model_meta(JINA).revision
COLPALI = "vidore/colpali-v1.3"
# Where the provenance check finds a clone or bare snapshot of embeddings-benchmark/results.
RESULTS_REPO_ENV = "MTEB_RESULTS_REPO"


def write_model(clone: Path, model: str, revision: str, scores: dict, experiment: dict | None = None) -> None:
    """results/{org__model}/{revision}/[experiments/{name}/]{Task}.json + model_meta.json, as in the repository."""
    folder = clone / "results" / model.replace("/", "__") / revision
    meta = mteb.get_model_meta(model).model_copy(update={"revision": revision})
    if experiment:
        (name, kwargs), = experiment.items()
        folder = folder / "experiments" / name
        meta = meta.model_copy(update={"experiment_kwargs": kwargs})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_meta.json").write_text(json.dumps(meta.to_dict(), default=str))
    for task, value in scores.items():
        scored_task_result(task, value).to_disk(folder / f"{task}.json")


def git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """jina-embeddings-v4 with single-vector ViDoRe(v3) files (0.40) in its folder and multi-vector ones (0.55) in
    the experiment folder, one of them lacking three languages; colpali complete on v3 at 0.50."""
    clone = tmp_path_factory.mktemp("repo") / "results-repo"
    write_model(clone, JINA, JINA_REVISION, {task: 0.40 for task in V3})
    multi = {task: 0.55 for task in V3}
    multi[V3[1]] = {lang: 0.90 for lang in LANGS[:3]}  # partial: mteb averages just these three languages
    write_model(clone, JINA, JINA_REVISION, multi, experiment={"vector_type_multi_vector": {"vector_type": "multi_vector"}})
    write_model(clone, JINA, JINA_REVISION, {V3[2]: 0.01}, experiment={"other_setting": {"x": 1}})
    write_model(clone, COLPALI, mteb.get_model_meta(COLPALI).revision, {task: 0.50 for task in V3} | {V3_1[0]: 0.3})
    git(clone, "init", "-q")
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "results")
    bare = clone.parent / "snapshot.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(clone), str(bare)], check=True)
    return {"clone": clone, "bare": bare, "commit": git(clone, "rev-parse", "HEAD")}


def test_a_preferred_experiment_gives_the_mode_and_partial_languages_are_flagged(repository, tmp_path):
    records = {r["model"]: r for r in collect_reference_scores(repository["clone"], models=[JINA, COLPALI])}
    jina = records[JINA]
    assert jina["mode"] == "multi-vector" and "vector_type_multi_vector" in jina["mode_note"]
    task = jina["tasks"][V3[0]]
    assert task["experiment"] == "vector_type_multi_vector" and task["scores"]["ndcg_at_5"] == pytest.approx(0.55)
    assert task["path"] == (f"results/jinaai__jina-embeddings-v4/{JINA_REVISION}/experiments/vector_type_multi_vector/"
                            f"{V3[0]}.json")
    assert jina["tasks"][V3[2]]["scores"]["ndcg_at_5"] == pytest.approx(0.55)  # never another experiment's 0.01
    partial = jina["tasks"][V3[1]]
    assert partial["missing_subsets"] == LANGS[3:] and partial["subsets_of"] == 6
    v3 = jina["benchmarks"]["ViDoRe(v3)"]
    assert (v3["n_tasks"], v3["of"], v3["partial_tasks"]) == (10, 10, [V3[1]])
    assert "missing_subsets" not in records[COLPALI]["tasks"][V3[0]]
    assert records[COLPALI]["benchmarks"]["ViDoRe(v3.1)"]["n_tasks"] == 1
    # ranks per benchmark: a partial model is not ranked, and the README says why
    assert benchmark_ranks(list(records.values()), "ViDoRe(v3)") == {COLPALI: 1}
    readme = leaderboard_markdown(list(records.values()))
    assert "| ViDoRe(v3) | ViDoRe(v3.1) |" in readme
    v3_mean = 100 * v3["ndcg_at_10_mean"]  # ViDoRe(v3) ranks by NDCG@10
    assert v3["ndcg_at_5_mean"] == pytest.approx((9 * 0.55 + 0.90) / 10)
    assert f"| {JINA} (multi-vector) | {v3_mean:.2f} (n=10/10, 1 partial) | — |" in readme
    colpali_v3 = 100 * records[COLPALI]["benchmarks"]["ViDoRe(v3)"]["ndcg_at_10_mean"]
    colpali_v31 = 100 * records[COLPALI]["benchmarks"]["ViDoRe(v3.1)"]["ndcg_at_10_mean"]
    assert f"| {COLPALI} | #1 {colpali_v3:.2f} (n=10/10) | {colpali_v31:.2f} (n=1/10) |" in readme
    assert f"{V3[1]} lacks {', '.join(LANGS[3:])}" in readme
    # in comparisons the partial reference is left out of the ranking
    write_reference_files(list(records.values()), tmp_path / "leaderboard")
    references = load_reference_models(tmp_path / "leaderboard")
    mine = write_results(tmp_path / "mine", "me/model", "r1", {task: 0.52 for task in V3})
    from colintern.reports.results import load_result_folder

    (own,) = load_result_folder(mine)
    comparison = build_comparison([own], "ndcg_at_5", references=references)
    rank = comparison.rank(own, comparison.groups[0])
    assert (rank.position, rank.of, rank.left_out) == (1, 2, 1)


def test_a_bare_snapshot_reads_like_the_clone(repository):
    from_clone = collect_reference_scores(repository["clone"], models=[JINA, COLPALI])
    from_snapshot = collect_reference_scores(repository["bare"], models=[JINA, COLPALI])
    assert from_snapshot == from_clone
    assert from_snapshot[0]["source"]["commit"] == repository["commit"]


def test_without_a_path_it_makes_a_sparse_clone_of_the_repository(repository):
    url = repository["clone"].as_uri()  # a local "remote": the same git commands as for GitHub
    records = collect_reference_scores(None, models=[COLPALI], repository=url)
    assert records == collect_reference_scores(repository["clone"], models=[COLPALI], repository=url)
    assert records[0]["source"] == {"repository": url, "commit": repository["commit"]}
    with pytest.raises(ColinternError, match=r"could not clone .*pass a clone or snapshot made elsewhere"):
        collect_reference_scores(None, models=[COLPALI], repository=(repository["clone"].parent / "nowhere").as_uri())


def test_a_folder_that_is_neither_clone_nor_snapshot_is_refused(tmp_path):
    with pytest.raises(ColinternError, match="no results/ folder, not a bare git snapshot"):
        collect_reference_scores(tmp_path)


def test_an_unchanged_reference_file_keeps_its_date(repository, tmp_path):
    records = collect_reference_scores(repository["clone"], models=[COLPALI])
    out = tmp_path / "leaderboard"
    write_reference_files(records, out)
    path = out / "vidore__colpali-v1.3.json"
    text = path.read_text().replace(records[0]["generated"]["date"], "2000-01-01")
    path.write_text(text)
    write_reference_files(records, out)
    assert path.read_text() == text  # only the date would differ: the file is left as it was


# ------------------------------------------------------------------------------------------------- provenance


def _snapshot() -> Path:
    raw = os.environ.get(RESULTS_REPO_ENV)
    if not raw:
        pytest.skip(f"no snapshot of embeddings-benchmark/results: set {RESULTS_REPO_ENV} to a clone or bare "
                    "snapshot (git clone --depth 1 https://github.com/embeddings-benchmark/results)")
    path = Path(raw).expanduser()
    if not path.exists():
        pytest.skip(f"{RESULTS_REPO_ENV}={raw} does not exist")
    return path


def test_the_shipped_references_match_the_results_repository(tmp_path):
    """Every stored metric of every shipped reference file equals mteb's reading of the file it names, at the
    commit it names (read with git from a clone or bare snapshot; stored values are rounded to 6 decimals)."""
    repo = _snapshot()
    references = load_reference_models(DEFAULT_LEADERBOARD_DIR)
    assert {r.model_name for r in references} == set(REFERENCE_MODELS)
    checked = 0
    for reference in references:
        record = json.loads(Path(reference.origin).read_text())
        commit = record["source"]["commit"]
        try:
            git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
        except subprocess.CalledProcessError:
            pytest.skip(f"the snapshot {repo} does not have commit {commit}: fetch it (git fetch origin {commit})")
        for task, entry in record["tasks"].items():
            raw = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{entry['path']}"], check=True,
                                 capture_output=True).stdout
            copy = tmp_path / Path(entry["path"]).name
            copy.write_bytes(raw)
            result = read_task_result(copy)  # mteb's TaskResult.from_disk, as the refresh read it
            scores = task_scores(result)
            assert result.task_name == task and scores.mteb_version == entry["mteb_version"]
            for metric, value in entry["scores"].items():
                assert scores.scores[metric] == pytest.approx(value, abs=5.01e-7), (record["model"], task, metric)
                checked += 1
    assert checked > 5000


def test_a_refresh_from_the_results_repository_reproduces_the_shipped_files():
    repo = _snapshot()
    records = collect_reference_scores(repo)
    for record in records:
        shipped = json.loads((DEFAULT_LEADERBOARD_DIR / (record["model"].replace("/", "__") + ".json")).read_text())
        for data in (record, shipped):
            data["generated"].pop("date")
        assert record == shipped, record["model"]
    assert (DEFAULT_LEADERBOARD_DIR / "README.md").read_text() == leaderboard_markdown(records)


def test_the_refreshed_references_hold_the_published_2026_figures():
    """Benchmark means x100 of the new references and jina-embeddings-v4's multi-vector ViDoRe(v3) (issue 18)."""
    records = {json.loads(p.read_text())["model"]: json.loads(p.read_text())
               for p in DEFAULT_LEADERBOARD_DIR.glob("*.json")}
    expected = {  # model: {benchmark: mean x100}
        JINA: {"ViDoRe(v1)": 90.35, "ViDoRe(v2)": 58.23, "ViDoRe(v3)": 56.34},
        "vultr/VultronRetrieverFlash-Qwen3.5-0.8B": {"ViDoRe(v1)": 88.15, "ViDoRe(v2)": 60.36, "ViDoRe(v3)": 56.16},
        "DataScience-UIBK/Argus-Colqwen3.5-9b-v0": {"ViDoRe(v1)": 92.67, "ViDoRe(v2)": 69.27},
        "webAI-Official/webAI-ColVec1.1-8b": {"ViDoRe(v3)": 64.95},
    }
    for model, means in expected.items():
        for benchmark, value in means.items():
            entry = records[model]["benchmarks"][benchmark]
            assert round(100 * entry[f"{entry['main_metric']}_mean"], 2) == value, (model, benchmark)
    assert records[JINA]["mode"] == "multi-vector"
    assert records[JINA]["benchmarks"]["ViDoRe(v3.1)"]["partial_tasks"] == ["Vidore3HrRetrieval.v2"]
