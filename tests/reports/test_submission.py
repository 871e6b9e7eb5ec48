"""scripts/export_submission.py: the results repository's layout and an mteb ModelMeta module, checked by loading
them back with mteb; on a real demo-sized evaluation (tiny pretrained retriever on SynthDocs, a dry run) and on
ViDoRe(v3)-shaped results written by mteb's own ResultCache (8 public tasks: the private two are for the
maintainers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mteb
import pytest
from mteb.cache import ResultCache

from colintern.reports.submission import OTHER_TASKS, export_submission
from colintern.utils import ColinternError
from tests.mteb_results import write_results

REPO_ROOT = Path(__file__).resolve().parents[2]
V3 = mteb.get_benchmark("ViDoRe(v3)").tasks
PUBLIC_V3 = [t.metadata.name for t in V3 if t.metadata.is_public]
PRIVATE_V3 = sorted(t.metadata.name for t in V3 if not t.metadata.is_public)


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory, colintern_home, small_synthdocs_dir):
    from colintern.evaluation import evaluate

    root = tmp_path_factory.mktemp("demo")
    summary = evaluate("embedded:tiny-internvl3_5-pretrained", [str(small_synthdocs_dir)], output_dir=root / "eval",
                       batch_size=8, show_progress=False)
    return summary


def test_the_demo_bundle_loads_back_in_mteb_with_the_same_means(demo_results, tmp_path):
    out = tmp_path / "bundle"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "export_submission.py"), str(demo_results.results_dir),
               "--name", "me/colintern-demo", "--include-local-tasks", "--output-dir", str(out)]
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    score = demo_results.score("SynthDocsRetrieval", "ndcg_at_5")
    assert f"{OTHER_TASKS}: {100 * score:.2f} (1/1 tasks)" in done.stdout
    folder = out / "results" / "me__colintern-demo" / demo_results.revision
    assert sorted(p.name for p in folder.iterdir()) == ["SynthDocsRetrieval.json", "model_meta.json"]
    assert (folder / "SynthDocsRetrieval.json").read_bytes() == (
        demo_results.results_dir / "SynthDocsRetrieval.json").read_bytes()
    # mteb's own loader, independently of the command's check
    loaded = ResultCache(out).load_results(models=["me/colintern-demo"], include_remote=False)
    (model,) = loaded.model_results
    assert (model.model_name, model.model_revision) == ("me/colintern-demo", demo_results.revision)
    assert model.task_results[0].get_score() == pytest.approx(score)
    manifest = json.loads((out / "submission.json").read_text())
    assert manifest["local_tasks_included"] == ["SynthDocsRetrieval"]
    assert "Dry run only" in (out / "SUBMISSION.md").read_text()
    # without --include-local-tasks there is nothing the leaderboard could take
    with pytest.raises(ColinternError, match="no results of mteb tasks .*--include-local-tasks"):
        export_submission(demo_results.results_dir, "me/colintern-demo", tmp_path / "other")


def test_vidore_v3_bundle_names_the_private_tasks_and_has_a_working_model_module(tmp_path):
    scores = {task: 0.4 + 0.05 * i for i, task in enumerate(PUBLIC_V3)}
    folder = write_results(tmp_path / "eval", "colintern/run-7", "abc1234", scores)
    bundle = export_submission(tmp_path / "eval", "acme/colintern3_5-1b", tmp_path / "bundle", revision="f" * 40)
    assert bundle.private_tasks == PRIVATE_V3 and sorted(bundle.tasks) == sorted(PUBLIC_V3)
    from colintern.reports.results import load_result_folder

    (own,) = load_result_folder(folder)
    ours = sum(own.tasks[t].main_score for t in PUBLIC_V3) / len(PUBLIC_V3)
    assert bundle.means["ViDoRe(v3)"]["mean"] == pytest.approx(ours) and bundle.means["ViDoRe(v3)"]["of"] == 10
    loaded = ResultCache(tmp_path / "bundle").load_results(models=["acme/colintern3_5-1b"], include_remote=False,
                                                           tasks="ViDoRe(v3)")
    (model,) = loaded.model_results
    assert sum(r.get_score() for r in model.task_results) / len(model.task_results) == pytest.approx(ours)
    guide = (tmp_path / "bundle" / "SUBMISSION.md").read_text()
    assert "Private tasks: the maintainers must run them" in guide and all(t in guide for t in PRIVATE_V3)
    # the generated model module is real mteb code: its ModelMeta equals the bundle's model_meta.json
    (module,) = (tmp_path / "bundle" / "mteb_model").glob("*.py")
    source = module.read_text()
    namespace: dict = {}
    exec(compile(source, str(module), "exec"), namespace)  # noqa: S102 - the file we just generated
    meta = namespace["MODEL_META"]
    stored = json.loads((tmp_path / "bundle" / "results" / "acme__colintern3_5-1b" / ("f" * 40) /
                         "model_meta.json").read_text())
    assert (meta.name, meta.revision, meta.n_parameters) == ("acme/colintern3_5-1b", "f" * 40, stored["n_parameters"])
    assert meta.loader.__name__ == "load_colintern3_5" and stored["loader_kwargs"] == {}


def test_the_output_folder_rules(tmp_path):
    write_results(tmp_path / "eval", "colintern/run", "r1", {PUBLIC_V3[0]: 0.5})
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ColinternError, match="is not empty and is no submission bundle"):
        export_submission(tmp_path / "eval", "acme/m", user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    out = tmp_path / "bundle"
    export_submission(tmp_path / "eval", "acme/m", out)
    (out / "my-notes.md").write_text("a user's file in the bundle folder")
    write_results(tmp_path / "eval", "colintern/run", "r1", {PUBLIC_V3[1]: 0.6})
    again = export_submission(tmp_path / "eval", "acme/m", out)  # an earlier bundle of the same name: replaced
    assert sorted(again.tasks) == sorted(PUBLIC_V3[:2])
    assert (out / "my-notes.md").read_text() == "a user's file in the bundle folder"
    assert len(list((out / "results" / "acme__m" / "r1").glob("Vidore3*.json"))) == 2
    with pytest.raises(ColinternError, match="holds the bundle of acme/m, not acme/other"):
        export_submission(tmp_path / "eval", "acme/other", out)
    for bad in ("no-org", "../x/y", "a/b/c"):
        with pytest.raises(ColinternError, match="is not a Hugging Face model id"):
            export_submission(tmp_path / "eval", bad, tmp_path / "b2")
    with pytest.raises(ColinternError, match="cannot name a folder"):
        export_submission(tmp_path / "eval", "acme/m", tmp_path / "b3", revision="../up")
    write_results(tmp_path / "eval", "colintern/other-run", "r2", {PUBLIC_V3[0]: 0.5})
    with pytest.raises(ColinternError, match="holds the results of 2 models or revisions"):
        export_submission(tmp_path / "eval", "acme/m", tmp_path / "b4")
