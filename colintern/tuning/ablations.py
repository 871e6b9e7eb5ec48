"""Ablations: a baseline configuration, one parameter varied at a time, every variant trained, evaluated and logged.

    plan = plan_ablation(base_config, {"training.learning_rate": [1e-5, 2e-5, 5e-5]}, name="lr")
    run_ablation(plan, log_path="experiments/log.jsonl")

Each variant trains in its own process (a crash or an out-of-memory kill cannot end the sweep), is evaluated with
mteb, diagnosed from its trainer_state.json, and appended as one JSON line to the log. A variant whose configuration
is already in the log as finished (ok, or a reproducible NaN) is skipped, so an interrupted sweep resumes. The
Markdown table is rebuilt from the log after every variant.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from colintern.training.arguments import RENAMED_FIELDS, RunConfig, apply_overrides, canonical_path
from colintern.utils import PACKAGE_DIR, ColinternError, atomic_write_json, atomic_write_text, safe_name

logger = logging.getLogger(__name__)

# short names for the fields people vary most; any `section.field` works too
ALIASES = {
    "lr": "training.learning_rate",
    "lr_head": "training.lr_head",
    "batch": "training.per_device_train_batch_size",
    "batch_size": "training.per_device_train_batch_size",
    "grad_accum": "training.gradient_accumulation_steps",
    "warmup": "training.warmup_steps",
    "epochs": "training.num_train_epochs",
    "steps": "training.max_steps",
    "wd": "training.weight_decay",
    "weight_decay": "training.weight_decay",
    "loss": "training.loss",
    "temperature": "training.temperature",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "dropout": "lora.dropout",
    "tokens": "model.max_num_visual_tokens",
}
FINISHED = ("ok", "nan")  # statuses a re-run skips; "failed" and "interrupted" variants run again


def field_path(key: str) -> tuple[str, str]:
    path = canonical_path(ALIASES.get(key, key))
    if "." not in path:
        raise ColinternError(f"--vary {key}: use section.field (e.g. training.learning_rate) or one of {', '.join(ALIASES)}")
    section, name = path.split(".", 1)
    return section, name


def parse_vary(specs: list[str]) -> dict[str, list[str]]:
    """["lr=1e-5,2e-5", "batch=4,8"] -> {"training.learning_rate": ["1e-5", "2e-5"], "training.per_device_train_batch_size": ["4", "8"]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ColinternError(f"--vary {spec!r}: expected name=value1,value2,...")
        key, values = spec.split("=", 1)
        section, name = field_path(key.strip())
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise ColinternError(f"--vary {spec!r}: no values")
        out[f"{section}.{name}"] = choices
    return out


@dataclass
class Variant:
    name: str
    overrides: dict[str, object]  # "section.field" -> value as given
    config: RunConfig

    @property
    def config_hash(self) -> str:
        data = self.config.to_dict()
        data["training"].pop("resume_from_checkpoint", None)
        return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class AblationPlan:
    name: str
    base: RunConfig
    variants: list[Variant] = field(default_factory=list)
    benchmarks: list[str] = field(default_factory=lambda: ["SynthDocsRetrieval"])


_SHORT = {new: old for old, new in RENAMED_FIELDS.items()}  # folder names stay short: lr=1e-3, not learning_rate=1e-3


def _effective_batch(config: RunConfig) -> int:
    return config.training.per_device_train_batch_size * config.training.gradient_accumulation_steps


def _format_value(value: str) -> str:
    return value.replace("/", "_")


def plan_ablation(
    base: RunConfig,
    vary: dict[str, list[str]],
    *,
    name: str | None = None,
    output_root: str | Path = "experiments/runs/ablations",
    scale_lr: str | None = None,
    grid: bool = False,
    benchmarks: list[str] | None = None,
) -> AblationPlan:
    """The variants of an ablation: one factor at a time around the base (default) or the full grid (`grid=True`).

    `scale_lr` ("linear" or "sqrt") keeps the learning rate proportional to the effective batch when the batch size
    or accumulation varies: lr = base_lr x (batch / base_batch) or x sqrt(batch / base_batch).
    """
    if scale_lr not in (None, "linear", "sqrt"):
        raise ColinternError("--scale-lr must be linear or sqrt")
    name = name or base.experiment.name or "ablation"
    vary = {canonical_path(path): values for path, values in vary.items()}
    plan = AblationPlan(name=name, base=base, benchmarks=list(benchmarks or ["SynthDocsRetrieval"]))
    if grid:
        combos = [dict(zip(vary, values)) for values in itertools.product(*vary.values())]
    else:
        combos = [{key: value} for key, values in vary.items() for value in values]
    for combo in combos:
        config = copy.deepcopy(base)
        nested: dict[str, dict] = {}
        for path, value in combo.items():
            section, field_name = path.split(".", 1)
            nested.setdefault(section, {})[field_name] = value
        apply_overrides(config, nested, f"variant {combo}")
        if "lora.rank" in combo and "lora.alpha" not in combo:
            config.lora.alpha = config.lora.rank  # the advisor's rule: alpha = rank
        if scale_lr and "training.learning_rate" not in combo and _effective_batch(config) != _effective_batch(base):
            ratio = _effective_batch(config) / _effective_batch(base)
            config.training.learning_rate = base.training.learning_rate * (ratio if scale_lr == "linear" else math.sqrt(ratio))
        label = ",".join(f"{_SHORT.get(path.split('.')[-1], path.split('.')[-1])}={_format_value(str(v))}"
                         for path, v in combo.items())
        config.training.output_dir = str(Path(output_root) / safe_name(name, fallback="ablation") / label)
        config.training.resume_from_checkpoint = None
        config.training.overwrite = True  # the variant's folder is the sweep's own: an unfinished try is set aside
        config.experiment.name = f"{name}/{label}"
        config.experiment.hyperparameters_under_test = sorted(combo)
        overrides = dict(combo)
        if scale_lr and "training.learning_rate" not in combo and config.training.learning_rate != base.training.learning_rate:
            overrides["training.learning_rate (scaled)"] = config.training.learning_rate
        plan.variants.append(Variant(label, overrides, config))
    return plan


# ------------------------------------------------------------------------------------------------ the log
def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                logger.warning("%s:%d is not valid JSON; ignored", path, number)
    return records


def append_log(path: str | Path, record: dict) -> None:
    """Append one record as a line; flushed and fsynced so a crash cannot leave half a line behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str, allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def finished_hashes(records: list[dict]) -> set[str]:
    """Configurations already run to the end whose run directory still exists (deleted runs are run again)."""
    return {
        r["config_hash"]
        for r in records
        if r.get("status") in FINISHED and "config_hash" in r and Path(r.get("checkpoint", "")).is_dir()
    }


# ------------------------------------------------------------------------------------------------ running
def _train_in_subprocess(variant: Variant, log_file: Path) -> tuple[int, float]:
    out = Path(variant.config.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "ablation_config.json"
    atomic_write_json(config_path, variant.config.to_dict())
    # The colintern that runs this ablation (a checkout or an installed package) trains the variant, too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(log_file, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "colintern.training", "--config", str(config_path)],
                              stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    return done.returncode, time.perf_counter() - started


def _last_error_line(log_file: Path) -> str:
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["(no output)"])[-1][:500]


def _history_summary(run_dir: Path) -> dict:
    """Final train/eval loss, NaN flag and the diagnosis' finding kinds from the run's trainer_state.json."""
    from colintern.reports.training import training_report

    try:
        report = training_report(run_dir)
    except ColinternError as error:
        return {"diagnosis_error": str(error)}
    history = report.history
    losses = [v for v in history.loss if math.isfinite(v)]
    evals = [v for v in history.eval_loss if math.isfinite(v)]
    kinds = sorted({f.kind for f in report.findings if f.severity != "info"})
    return {
        "steps": history.global_step,
        "final_train_loss": round(losses[-1], 4) if losses else None,
        "final_eval_loss": round(evals[-1], 4) if evals else None,
        "nan": any(f.kind == "nan" for f in report.findings),
        "flags": kinds,
        "verdict": report.verdict,
    }


def run_variant(variant: Variant, plan: AblationPlan, log_path: Path) -> dict:
    """Train, evaluate and diagnose one variant; never raises for a failed variant, returns its record."""
    out = Path(variant.config.training.output_dir)
    record: dict = {
        "experiment": plan.name,
        "variant": variant.name,
        "overrides": variant.overrides,
        "config_hash": variant.config_hash,
        "checkpoint": str(out),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    logger.info("Variant %s: training -> %s", variant.name, out)
    code, seconds = _train_in_subprocess(variant, out.parent / f"{out.name}.log")
    record["wall_time_s"] = round(seconds, 1)
    record.update(_history_summary(out))
    train_results = out / "train_results.json"
    if train_results.is_file():
        metrics = json.loads(train_results.read_text())
        record["peak_memory_gb"] = metrics.get("peak_memory_gb")
        record["train_seconds"] = metrics.get("train_wall_seconds")
        if record.get("final_train_loss") is None and metrics.get("train_loss") is not None:
            record["final_train_loss"] = round(float(metrics["train_loss"]), 4)  # run too short to log: its mean
    if code != 0:
        record["status"] = "nan" if record.get("nan") else ("interrupted" if code == 130 else "failed")
        record["error"] = _last_error_line(out.parent / f"{out.name}.log")
        logger.warning("Variant %s %s: %s", variant.name, record["status"], record["error"])
    else:
        record["status"] = "ok"
        try:
            record.update(_evaluate(out, plan.benchmarks))
        except Exception as error:  # noqa: BLE001 - an evaluation failure is recorded, the sweep goes on
            record["status"] = "failed"
            record["error"] = f"evaluation: {type(error).__name__}: {error}"[:500]
    record["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    append_log(log_path, record)
    return record


def _evaluate(run_dir: Path, benchmarks: list[str]) -> dict:
    from colintern.evaluation import evaluate

    summary = evaluate(str(run_dir), benchmarks, output_dir=run_dir / "results", show_progress=False)
    metrics: dict = {"evaluation": {}}
    for row in summary.rows:
        metrics["evaluation"][row.task] = {k: row.scores.get(k) for k in ("ndcg_at_5", "ndcg_at_10", "recall_at_100")}
    values = [m["ndcg_at_5"] for m in metrics["evaluation"].values() if m.get("ndcg_at_5") is not None]
    metrics["ndcg_at_5"] = round(sum(values) / len(values), 5) if values else None
    return metrics


def run_ablation(plan: AblationPlan, log_path: str | Path = "experiments/log.jsonl",
                 table_path: str | Path | None = None) -> list[dict]:
    """Run every variant not yet finished in the log; rebuild the Markdown table after each."""
    log_path = Path(log_path)
    default_table = log_path.with_name(f"{safe_name(plan.name, fallback='ablation')}.md")
    table_path = Path(table_path) if table_path else default_table
    done = finished_hashes(read_log(log_path))
    records = []
    for variant in plan.variants:
        if variant.config_hash in done:
            logger.info("Variant %s: already in %s, skipped", variant.name, log_path)
            continue
        records.append(run_variant(variant, plan, log_path))
        write_table(plan.name, read_log(log_path), table_path)
    write_table(plan.name, read_log(log_path), table_path)
    return records


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if not math.isnan(value) else "NaN"
    return str(value)


def ablation_table(name: str, records: list[dict]) -> str:
    """Markdown table of an experiment's latest record per variant."""
    latest: dict[str, dict] = {}
    for record in records:
        if record.get("experiment") == name:
            latest[record["variant"]] = record
    header = ("variant", "status", "train loss", "eval loss", "NDCG@5", "flags", "wall s", "peak GB", "checkpoint")
    lines = [f"# Ablation: {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, r in latest.items():
        flags = ", ".join(r.get("flags") or []) or ("NaN" if r.get("nan") else "—")
        lines.append(
            "| " + " | ".join([
                variant, r.get("status", "?"), _fmt(r.get("final_train_loss")), _fmt(r.get("final_eval_loss")),
                _fmt(r.get("ndcg_at_5")), flags, _fmt(r.get("wall_time_s")), _fmt(r.get("peak_memory_gb")),
                f"`{r.get('checkpoint', '')}`",
            ]) + " |"
        )
    errors = [(v, r["error"]) for v, r in latest.items() if r.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- **{v}**: {e}" for v, e in errors]
    return "\n".join(lines) + "\n"


def write_table(name: str, records: list[dict], path: str | Path) -> Path:
    atomic_write_text(path, ablation_table(name, records))
    return Path(path)
