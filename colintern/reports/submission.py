"""A leaderboard submission bundle from colintern's evaluation results (scripts/export_submission.py).

    bundle = export_submission("results/mteb_evaluation", "my-org/colintern3_5-1b", "submission/")

Writes, into a new folder (or over an earlier bundle of the same model):

    results/{org__model}/{revision}/{Task}.json   mteb's result files, byte for byte as the evaluation wrote them
    results/{org__model}/{revision}/model_meta.json   the model's mteb ModelMeta, with the published name/revision
    mteb_model/{org_model}_models.py   a ModelMeta + loader module for the mteb model-registry pull request
    submission.json   what was exported, from where, and the benchmark means
    SUBMISSION.md     what to open where, and what the maintainers must run (private ViDoRe(v3) tasks)

and checks the bundle: mteb's own `ResultCache.load_results` reads the results folder back, and the benchmark means
computed from what it loaded must equal the means of the evaluation's files; the generated module is imported and
its ModelMeta compared with model_meta.json.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from colintern.mteb_results import KNOWN_BENCHMARKS, benchmark_tasks, task_main_metric
from colintern.reports.results import OTHER_TASKS, ResultSet, load_result_folder
from colintern.utils import (
    OUTPUT_RECORD,
    ColinternError,
    atomic_write_json,
    atomic_write_text,
    prepare_output_dir,
    read_output_record,
)

logger = logging.getLogger(__name__)

COMMAND = "export_submission"
MANIFEST = "submission.json"
RESULTS_REPOSITORY = "https://github.com/embeddings-benchmark/results"
MTEB_REPOSITORY = "https://github.com/embeddings-benchmark/mteb"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Fields of model_meta.json that the generated module does not set (mteb derives them or they name the loader).
_NOT_IN_MODULE = {"loader", "name", "revision", "loader_kwargs", "is_cross_encoder", "experiment_kwargs"}


@dataclass
class Bundle:
    folder: Path
    name: str
    revision: str
    tasks: list[str]
    local_tasks: list[str]  # tasks mteb does not know (SynthDocs, your folders): for a dry run only
    private_tasks: list[str]  # tasks of the exported benchmarks that only their maintainers can run
    means: dict[str, dict] = field(default_factory=dict)  # benchmark -> {"mean", "n_tasks", "of", "metric"}


def _registered(task: str) -> bool:
    return task_main_metric(task) is not None


def _private(task: str) -> bool:
    import mteb

    try:
        return not mteb.get_task(task).metadata.is_public
    except Exception:  # noqa: BLE001 - not an mteb task
        return False


def _pick_result_set(source: Path) -> ResultSet:
    result_sets = [rs for rs in load_result_folder(source) if not rs.is_reference]
    if len(result_sets) > 1:
        folders = ", ".join(str(rs.origin) for rs in result_sets)
        raise ColinternError(f"{source} holds the results of {len(result_sets)} models or revisions ({folders}): pass "
                             "the one to export (its results/<model>/<revision> folder).")
    return result_sets[0]


def benchmark_means(scores: dict[str, float]) -> dict[str, dict]:
    """{benchmark: {"mean", "n_tasks", "of"}} of main scores {task: score}, for the known benchmarks present, and
    OTHER_TASKS for tasks of none of them (e.g. SynthDocs in a dry run)."""
    means = {}
    grouped = set()
    for benchmark in KNOWN_BENCHMARKS:
        members = benchmark_tasks(benchmark)
        have = [scores[t] for t in members if t in scores]
        grouped.update(members)
        if have:
            means[benchmark] = {"mean": sum(have) / len(have), "n_tasks": len(have), "of": len(members)}
    other = [value for task, value in sorted(scores.items()) if task not in grouped]
    if other:
        means[OTHER_TASKS] = {"mean": sum(other) / len(other), "n_tasks": len(other), "of": len(other)}
    return means


def _claim_folder(output_dir: Path, name: str, inputs: dict):
    """The output folder: new or empty, or an earlier bundle of the same model (its files are replaced, nothing
    else in it is touched); anything else is refused."""
    overwrite = False
    if output_dir.is_dir() and any(p.name != OUTPUT_RECORD for p in output_dir.iterdir()):
        owned = read_output_record(output_dir).get(COMMAND)
        try:
            previous = json.loads((output_dir / MANIFEST).read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError, AttributeError):
            previous = None
        if not owned or MANIFEST not in owned:
            raise ColinternError(f"--output-dir {output_dir} is not empty and is no submission bundle written by "
                                 f"{COMMAND}: choose a new folder.")
        if previous != name:
            raise ColinternError(f"--output-dir {output_dir} holds the bundle of {previous}, not {name}: choose "
                                 "another folder.")
        overwrite = True
    return prepare_output_dir(output_dir, command=COMMAND, inputs=inputs, overwrite=overwrite)


def export_submission(
    source: str | Path,
    name: str,
    output_dir: str | Path,
    *,
    revision: str | None = None,
    include_local_tasks: bool = False,
) -> Bundle:
    """Write and check the submission bundle of the results in `source` (any folder `compare_models` reads)."""


    if not _NAME.fullmatch(name):
        raise ColinternError(f"--name {name!r} is not a Hugging Face model id: give it as org/model (letters, digits, "
                             "'.', '_', '-'), the id under which the model is published.")
    source, output_dir = Path(source), Path(output_dir)
    result_set = _pick_result_set(source)
    revision = revision or result_set.revision
    if not revision or not _REVISION.fullmatch(revision):
        raise ColinternError(f"the revision {revision!r} cannot name a folder: pass --revision (the model's Hub commit)")
    meta_path = Path(result_set.origin) / "model_meta.json"
    if not meta_path.is_file():
        raise ColinternError(f"{meta_path} is missing: the results were not written by mteb's ResultCache "
                             "(scripts/evaluate.py writes it). Re-run the evaluation.")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    local = sorted(t for t in result_set.tasks if not _registered(t))
    tasks = sorted(t for t in result_set.tasks if include_local_tasks or _registered(t))
    if not tasks:
        raise ColinternError(f"{source} holds no results of mteb tasks ({', '.join(local)} are local tasks, which the "
                             "leaderboard cannot take): evaluate a benchmark such as ViDoRe(v1), or pass "
                             "--include-local-tasks for a dry run of the bundle.")
    if local and not include_local_tasks:
        logger.warning("Leaving out local tasks mteb does not know: %s (--include-local-tasks for a dry run)",
                       ", ".join(local))
    meta.update(name=name, revision=revision, loader_kwargs={}, reference=f"https://huggingface.co/{name}")

    folder_name = name.replace("/", "__")
    output = _claim_folder(output_dir, name, {"RUN_OR_RESULTS": source})
    module_name = re.sub(r"\W", "_", name.split("/")[1].lower()) + "_models.py"
    private = sorted({t for b in KNOWN_BENCHMARKS for t in benchmark_tasks(b)
                      if _private(t) and any(t2 in result_set.tasks for t2 in benchmark_tasks(b))} - set(tasks))
    ours = benchmark_means({t: result_set.tasks[t].main_score for t in tasks})
    with output.staged() as stage:
        revision_dir = stage / "results" / folder_name / revision
        revision_dir.mkdir(parents=True)
        for task in tasks:
            source_file = Path(result_set.tasks[task].source)
            (revision_dir / f"{task}.json").write_bytes(source_file.read_bytes())
        atomic_write_json(revision_dir / "model_meta.json", meta)
        (stage / "mteb_model").mkdir()
        atomic_write_text(stage / "mteb_model" / module_name, model_module(meta))
        check_bundle(stage, name, revision, ours, {t: result_set.tasks[t].main_score for t in tasks}, module_name)
        atomic_write_json(stage / MANIFEST, {
            "name": name,
            "revision": revision,
            "source": str(Path(result_set.origin).resolve()),
            "tasks": tasks,
            "local_tasks_included": [t for t in tasks if t in local],
            "private_tasks_not_run": private,
            "benchmark_means": ours,
            "checked": "mteb.ResultCache.load_results read the results back; the benchmark means are equal",
            "date": _dt.date.today().isoformat(),
        })
        atomic_write_text(stage / "SUBMISSION.md", instructions(name, revision, folder_name, module_name, tasks,
                                                                 [t for t in tasks if t in local], private, ours))
    return Bundle(output_dir, name, revision, tasks, [t for t in tasks if t in local], private, ours)


def check_bundle(folder: Path, name: str, revision: str, expected_means: dict, expected_scores: dict,
                 module_name: str) -> None:
    """Load the bundle back with mteb (results and generated ModelMeta) and compare with what was exported."""
    from mteb.cache import ResultCache

    loaded = ResultCache(folder).load_results(models=[name], require_model_meta=True, include_remote=False,
                                              load_experiments="no_experiments")
    results = [r for model in loaded.model_results for r in model.task_results
               if model.model_name == name and model.model_revision == revision]
    scores = {r.task_name: float(r.get_score()) for r in results}
    if set(scores) != set(expected_scores):
        raise ColinternError(f"mteb loaded {sorted(scores)} back from the bundle, not {sorted(expected_scores)}")
    for task, value in expected_scores.items():
        if not math.isclose(scores[task], value, abs_tol=1e-9):
            raise ColinternError(f"mteb reads {task} back as {scores[task]}, the evaluation had {value}")
    means = benchmark_means(scores)
    for benchmark, entry in expected_means.items():
        if not math.isclose(means[benchmark]["mean"], entry["mean"], abs_tol=1e-9):
            raise ColinternError(f"the {benchmark} mean mteb reads back is {means[benchmark]['mean']}, not {entry['mean']}")
    meta = _import_model_meta(folder / "mteb_model" / module_name)
    stored = json.loads((folder / "results" / name.replace("/", "__") / revision / "model_meta.json").read_text())
    dumped = json.loads(json.dumps(meta.to_dict(), default=str))
    differing = [k for k in stored if k not in _NOT_IN_MODULE and _normal(dumped.get(k)) != _normal(stored[k])]
    if meta.name != name or meta.revision != revision or differing:
        raise ColinternError(f"the generated {module_name} does not reproduce model_meta.json: {differing}")


def _normal(value):
    """A JSON value with lists sorted: ModelMeta keeps some fields (training_datasets) as sets, whose order varies."""
    if isinstance(value, list):
        return sorted((_normal(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _import_model_meta(path: Path):
    spec = importlib.util.spec_from_file_location(f"_colintern_submission_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module.MODEL_META


def model_module(meta: dict) -> str:
    """Python source of a ModelMeta + loader for mteb's model registry (mteb/models/model_implementations/)."""
    fields = {k: v for k, v in meta.items() if k not in _NOT_IN_MODULE}
    body = "\n".join(f"    {key}={value!r}," for key, value in fields.items())
    return f'''"""{meta["name"]}: a ColIntern3.5 late-interaction page retriever (InternVL3.5 + a 128-dim projection,
MaxSim scoring), for mteb's model registry. Generated by colintern's scripts/export_submission.py from the
evaluation's model_meta.json; place it in mteb/models/model_implementations/ and register MODEL_META as other
model files there do."""

from __future__ import annotations

from typing import Any

from mteb._requires_package import requires_package
from mteb.models.model_meta import ModelMeta


def load_colintern3_5(model_name: str, revision: str | None = None, **kwargs: Any):
    """mteb's loader: colintern's own mteb wrapper (the one that produced the submitted scores)."""
    requires_package(load_colintern3_5, "colintern", model_name, "pip install colintern")
    from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper

    return ColIntern3_5Wrapper(model_name, model_name=model_name, revision=revision, **kwargs)


MODEL_META = ModelMeta(
    loader=load_colintern3_5,
    loader_kwargs={{}},
    name={meta["name"]!r},
    revision={meta["revision"]!r},
{body}
)
'''


def instructions(name: str, revision: str, folder_name: str, module_name: str, tasks: Sequence[str],
                 local: Sequence[str], private: Sequence[str], means: dict) -> str:
    lines = [
        f"# Leaderboard submission: {name} (revision {revision})",
        "",
        "Written by colintern's `scripts/export_submission.py`; checked by loading `results/` back with mteb's own "
        "`ResultCache.load_results` (benchmark means equal to the evaluation's) and importing the ModelMeta module.",
        "",
        "| benchmark | mean (x100) | tasks |",
        "|---|---:|---:|",
        *(f"| {b} | {100 * e['mean']:.2f} | {e['n_tasks']}/{e['of']} |" for b, e in means.items()),
        "",
        "## 1. The model file (pull request to mteb)",
        "",
        f"Copy `mteb_model/{module_name}` into a fork of {MTEB_REPOSITORY} as "
        f"`mteb/models/model_implementations/{module_name}` and open a pull request. The revision must be the "
        f"model's commit on the Hugging Face Hub, and `{name}` must be public there.",
        "",
        "## 2. The results (pull request to the results repository)",
        "",
        f"Copy `results/{folder_name}/` into a fork of {RESULTS_REPOSITORY} (as `results/{folder_name}/`) and open a "
        "pull request once the model file is merged. Its tasks: " + ", ".join(tasks) + ".",
    ]
    if local:
        lines += ["", "**Dry run only:** " + ", ".join(local) + " are local tasks mteb does not know; the results "
                  "repository cannot take them. Remove them (re-export without --include-local-tasks)."]
    if private:
        lines += [
            "",
            "## 3. Private tasks: the maintainers must run them",
            "",
            "These tasks of the benchmarks above are private (their data is not published), so no result for them is "
            "in this bundle: " + ", ".join(private) + ". Ask the ViDoRe/mteb maintainers in the pull request to run "
            "them with the merged model file:",
            "",
            "```python",
            "import mteb",
            f"model = mteb.get_model({name!r}, revision={revision!r})",
            f"tasks = mteb.get_tasks(tasks={list(private)!r})",
            "mteb.evaluate(model, tasks, cache=mteb.ResultCache('results-cache'))",
            "```",
            "",
            "The benchmark's leaderboard average covers all its tasks, so it appears only after they have been run.",
        ]
    return "\n".join(lines) + "\n"
