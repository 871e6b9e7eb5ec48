"""ViDoRe(v3) private tasks, page text (the ViDoRe(v3.1) shape) in both corpus-text modes, the protocol record and the
batch-invariance check: offline, with the tiny model, mteb's own task objects and local parquet files."""

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import mteb
import pytest
import torch
from mteb import TaskResult
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType

from colintern.cli import run
from colintern.evaluation import (
    check_invariance,
    evaluate,
    is_private,
    local_retrieval_task,
    model_results_dir,
    read_protocol,
    resolve_benchmarks,
    results_table,
)
from colintern.evaluation.invariance import sample_task
from colintern.model.encoding import encode_pages
from colintern.utils import ColinternError
from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper
from tests.conftest import REPO_ROOT

V3_PUBLIC = [
    "Vidore3FinanceEnRetrieval",
    "Vidore3IndustrialRetrieval",
    "Vidore3ComputerScienceRetrieval",
    "Vidore3PharmaceuticalsRetrieval",
    "Vidore3HrRetrieval",
    "Vidore3FinanceFrRetrieval",
    "Vidore3PhysicsRetrieval",
    "Vidore3EnergyRetrieval",
]
V3_PRIVATE = ["Vidore3TelecomRetrieval", "Vidore3NuclearRetrieval"]


def run_script(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600, check=False)


# ---------------------------------------------------------------------------------------------------- private tasks
def test_vidore_v3_and_v3_1_keep_their_private_tasks_apart():
    (v3,) = resolve_benchmarks(["ViDoRe(v3)"])
    assert [t.metadata.name for t in v3.tasks] == V3_PUBLIC and v3.is_benchmark
    assert [t.metadata.name for t in v3.private] == V3_PRIVATE and v3.n_total == 10
    assert all(is_private(t) for t in v3.private) and not any(is_private(t) for t in v3.tasks)
    (v31,) = resolve_benchmarks(["ViDoRe(v3.1)"])
    assert [t.metadata.name for t in v31.tasks] == [f"{name}.v2" for name in V3_PUBLIC]
    assert [t.metadata.name for t in v31.private] == [f"{name}.v2" for name in V3_PRIVATE]
    assert {t.metadata.category for t in v31.tasks} == {"t2it"}  # page image + OCR text in every corpus row
    (single,) = resolve_benchmarks(["Vidore3NuclearRetrieval"])
    assert single.tasks == [] and [t.metadata.name for t in single.private] == ["Vidore3NuclearRetrieval"]


def write_task_result(results_dir, task, ndcg_at_10):
    """A result file as mteb writes it (every language subset of the test split), e.g. computed on another
    machine and copied here."""
    metrics = {"main_score": ndcg_at_10, "ndcg_at_10": ndcg_at_10, "ndcg_at_5": ndcg_at_10 - 0.05, "recall_at_100": 0.9}
    scores = {
        "test": [
            {"hf_subset": subset, "languages": langs, **metrics} for subset, langs in task.metadata.eval_langs.items()
        ]
    }
    result = TaskResult.model_validate(
        {
            "dataset_revision": task.metadata.revision,
            "task_name": task.metadata.name,
            "mteb_version": mteb.__version__,
            "scores": scores,
            "evaluation_time": 1.0,
            "kg_co2_emissions": None,
        }
    )
    result.to_disk(results_dir / f"{task.metadata.name}.json")


def test_vidore_v3_scores_the_public_tasks_and_reports_the_private_ones(tiny_adapter_dir, tmp_path, monkeypatch,
                                                                         capsys):  # fmt: skip
    results_dir = model_results_dir(str(tiny_adapter_dir), tmp_path)
    results_dir.mkdir(parents=True)
    values = {name: 0.40 + 0.01 * i for i, name in enumerate(V3_PUBLIC)}
    for name in V3_PUBLIC:
        write_task_result(results_dir, mteb.get_task(name), values[name])

    def no_data(self, *args, **kwargs):
        raise AssertionError(f"{self.metadata.name} is private: its data must never be loaded")

    for name in V3_PRIVATE:  # mteb's real task classes, with a tripwire on their loader
        monkeypatch.setattr(type(mteb.get_task(name)), "load_data", no_data)
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "evaluate.py"), run_name="evaluate_script")
    argv = ["--model-path", str(tiny_adapter_dir), "--benchmarks", "ViDoRe(v3)", "--output-dir", str(tmp_path),
            "--no-progress", "--json"]  # fmt: skip
    assert run(script["main"], script["build_parser"](), argv) == 0
    out = capsys.readouterr().out
    for name in V3_PRIVATE:
        assert f"| {name} " in out and "private: not run" in out.split(f"| {name} ")[1].splitlines()[0]
    mean = sum(values.values()) / len(values)
    (line,) = [line for line in out.splitlines() if "ViDoRe(v3) average" in line]
    cells = [cell.strip() for cell in line.strip("| ").split("|")]
    assert cells[:3] == ["**ViDoRe(v3) average**, 8 of 10 tasks (2 private: not run)", f"{100 * (mean - 0.05):.2f}",
                         f"{100 * mean:.2f}"]  # fmt: skip
    assert "Private tasks, not run" in out
    summary = json.loads(out[out.index("{"):])
    assert [entry["task"] for entry in summary["not_run"]] == V3_PRIVATE
    assert summary["computed"] == [] and [row["task"] for row in summary["tasks"]] == V3_PUBLIC
    assert summary["averages"][0]["n_private"] == 2 and summary["averages"][0]["n_tasks"] == 8

    # the same table from the files alone (as reports read them): the average says what it covers
    _rows, averages = results_table(results_dir)
    (v3,) = [a for a in averages if a.label == "ViDoRe(v3)"]
    assert (v3.n_tasks, v3.n_total, v3.n_private) == (8, 10, 2)
    assert v3.scores["ndcg_at_10"] == pytest.approx(mean)


def test_a_private_task_alone_is_reported_without_loading_the_model(tiny_adapter_dir, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("nothing to run: the model must not be loaded")

    monkeypatch.setattr(ColIntern3_5Wrapper, "__init__", no_model)
    summary = evaluate(str(tiny_adapter_dir), ["Vidore3TelecomRetrieval.v2"], output_dir=tmp_path, show_progress=False)
    assert summary.private == ["Vidore3TelecomRetrieval.v2"] and summary.rows == [] and summary.computed == []
    (row,) = [line for line in summary.table().splitlines() if "Vidore3TelecomRetrieval.v2" in line]
    assert [cell.strip() for cell in row.strip("| ").split("|")][:2] == ["Vidore3TelecomRetrieval.v2", "private: not run"]


# ---------------------------------------------------------------------------------------------------- page text
@pytest.fixture(scope="module")
def ocr_task_dir(small_synthdocs_dir, tmp_path_factory):
    """A local task shaped as ViDoRe(v3.1): every corpus row holds a page image and a text (here the description
    its query asks for, standing in for the page's OCR text; one page has none)."""
    folder = tmp_path_factory.mktemp("ocr") / "ocr-task"
    shutil.copytree(small_synthdocs_dir / "test", folder)
    corpus = datasets.Dataset.from_parquet(str(folder / "corpus.parquet"))
    queries = datasets.Dataset.from_parquet(str(folder / "queries.parquet"))
    qrels = datasets.Dataset.from_parquet(str(folder / "qrels.parquet"))
    query_text = dict(zip(queries["id"], queries["text"]))
    page_text = {row["corpus-id"]: query_text[row["query-id"]] for row in qrels}
    texts = [f"# Report\n{page_text.get(page, '')}" for page in corpus["id"]]
    texts[0] = ""
    texts[1] += "\n<img>figure 1</img> <IMG_CONTEXT>"  # markup in OCR text is text, not an image placeholder
    corpus.add_column("text", texts).to_parquet(str(folder / "corpus.parquet"))
    (folder / "task.json").write_text(json.dumps({"name": "OcrPagesRetrieval"}))
    return folder


def test_a_page_text_task_is_t2it_and_mteb_hands_the_wrapper_image_and_text(ocr_task_dir, tiny_adapter_dir):
    task = local_retrieval_task(ocr_task_dir)
    assert task.metadata.category == "t2it"
    task.load_data()
    corpus = task.dataset["default"]["test"]["corpus"]
    loader = create_dataloader(corpus, task_metadata=task.metadata, prompt_type=PromptType.document, batch_size=4)
    assert {"image", "text"} <= set(loader.dataset.column_names)  # what raised "inputs with both text and an image"

    ignore = ColIntern3_5Wrapper(str(tiny_adapter_dir), device="cpu", show_progress=False)
    prompt = ColIntern3_5Wrapper(str(tiny_adapter_dir), device="cpu", show_progress=False, corpus_text="prompt",
                                 corpus_text_max_tokens=8)  # fmt: skip
    kwargs = {"task_metadata": task.metadata, "hf_split": "test", "hf_subset": "default",
              "prompt_type": PromptType.document}  # fmt: skip
    image_only = ignore.encode(loader, **kwargs)
    with_text = prompt.encode(loader, **kwargs)
    text_ids = prompt.processor.page_text_ids(list(corpus["text"]), 8)
    assert len(text_ids[0]) == 0 and all(0 < len(ids) <= 8 for ids in text_ids[1:])
    for page, (alone, both, ids) in enumerate(zip(image_only, with_text, text_ids)):
        assert both.shape[0] == alone.shape[0] + len(ids), page  # image tokens, then the text tokens
        # causal attention: text after the image cannot change the image tokens
        torch.testing.assert_close(both[: alone.shape[0]].float(), alone.float(), atol=2e-3, rtol=0)
    assert not torch.allclose(with_text[1][-1].float(), with_text[2][-1].float())  # different texts, different tokens


def test_page_text_task_evaluates_in_both_modes_and_records_the_mode(ocr_task_dir, tiny_adapter_dir, tmp_path):
    runs = {}
    for mode in ("ignore", "prompt"):
        done = run_script(
            "--model-path", str(tiny_adapter_dir), "--benchmarks", str(ocr_task_dir), "--output-dir",
            str(tmp_path / mode), "--batch-size", "8", "--no-progress", "--corpus-text", mode, "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout[done.stdout.index("{"):])
        assert summary["corpus_text"] == mode and summary["computed"] == ["OcrPagesRetrieval"]
        runs[mode] = summary
        protocol = read_protocol(summary["results_dir"], "OcrPagesRetrieval")
        assert protocol["corpus_text"] == mode
        assert protocol["corpus_text_max_tokens"] == (1024 if mode == "prompt" else None)
    (ignore,), (prompt,) = runs["ignore"]["tasks"], runs["prompt"]["tasks"]
    assert all(0.0 <= row[m] <= 1.0 for row in (ignore, prompt) for m in ("ndcg_at_5", "ndcg_at_10"))
    assert ignore["ndcg_at_10"] != prompt["ndcg_at_10"]  # the text reached the embeddings

    # resuming into the folder of the other mode would mix two protocols in one table: refused, one line
    with pytest.raises(ColinternError, match=r"OcrPagesRetrieval .* other settings \(corpus_text 'ignore' there, "
                                             r"'prompt' now.*--output-dir"):  # fmt: skip
        evaluate(str(tiny_adapter_dir), [str(ocr_task_dir)], output_dir=tmp_path / "ignore", corpus_text="prompt",
                 show_progress=False)  # fmt: skip
    again = evaluate(str(tiny_adapter_dir), [str(ocr_task_dir)], output_dir=tmp_path / "ignore", show_progress=False)
    assert again.computed == []


# ---------------------------------------------------------------------------------------------------- protocol
def blake2b_16(path):
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def test_every_evaluation_writes_its_protocol(tiny_adapter_dir, tiny_model_dir, small_synthdocs_dir, tmp_path):
    summary = evaluate(str(tiny_adapter_dir), [str(small_synthdocs_dir)], output_dir=tmp_path, batch_size=4,
                       show_progress=False)  # fmt: skip
    (path,) = summary.protocol_files
    assert path == str(summary.results_dir / "protocol" / "SynthDocsRetrieval.json")
    protocol = json.loads(Path(path).read_text())
    assert protocol == read_protocol(summary.results_dir, "SynthDocsRetrieval")
    assert protocol["task"] == "SynthDocsRetrieval" and protocol["batch_size"] == 4
    assert protocol["colintern"]["version"] and protocol["versions"]["mteb"] == mteb.__version__
    model = protocol["model"]
    assert model["kind"] == "adapter" and model["revision"] == summary.revision
    assert model["adapter_weights"] == {
        "adapter_model.safetensors": blake2b_16(tiny_adapter_dir / "adapter_model.safetensors")
    }
    assert model["base_model"]["weights"]["model.safetensors"] == blake2b_16(tiny_model_dir / "model.safetensors")
    assert protocol["dtype"] == "float32" and protocol["device"] == "cpu" and protocol["attn_implementation"] == "sdpa"
    assert protocol["attention"] == "causal"
    assert (protocol["query_prefix"], protocol["query_augmentation_token"], protocol["n_augmentation_tokens"]) == (
        "Query: ", "<|endoftext|>", 10
    )
    assert protocol["max_num_visual_tokens"] > 0 and protocol["corpus_text"] == "none (image-only corpus)"
    assert "invariance" not in protocol  # no check was asked for
    # mteb's and colintern's readers still see exactly one task result in the folder
    assert [row.task for row in results_table(summary.results_dir)[0]] == ["SynthDocsRetrieval"]
    assert not list(summary.results_dir.glob("*.tmp*")) and not list((summary.results_dir / "protocol").glob(".*"))


# ---------------------------------------------------------------------------------------------------- invariance
def test_check_invariance_passes_from_the_command_line(tiny_adapter_dir, small_synthdocs_dir, tmp_path):
    done = run_script(
        "--model-path", str(tiny_adapter_dir), "--benchmarks", str(small_synthdocs_dir), "--output-dir",
        str(tmp_path), "--batch-size", "8", "--no-progress", "--check-invariance", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "batch invariance passed on SynthDocsRetrieval" in done.stdout
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    check = summary["invariance"]
    assert check["passed"] and check["max_score_diff"] <= 1e-4 and check["queries_with_other_top_k"] == 0
    assert check["n_pages"] == 24 and check["batch_size"] == 8
    protocol = read_protocol(summary["results_dir"], "SynthDocsRetrieval")
    assert protocol["invariance"]["max_score_diff"] == check["max_score_diff"]


def encode_queries_attending_padding(model, processor, queries, batch_size=32, progress=False,
                                     storage_dtype=torch.float16):  # fmt: skip
    """A real batch-dependence bug: queries of mixed length in one batch, left-padded to the longest, with the
    padding attended (an all-ones attention mask, as when pad tokens double as augmentation tokens)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(queries), batch_size):
            chunk = [processor.format_query(q) for q in queries[start : start + batch_size]]
            inputs = processor.process_texts(chunk)
            real = inputs["attention_mask"].bool()
            inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
            embeddings = model(**inputs)
            out += [embedding[keep].to("cpu", storage_dtype) for embedding, keep in zip(embeddings, real)]
    return out


def test_check_invariance_fails_on_attended_padding_and_passes_on_pages_with_text(tiny_retriever, ocr_task_dir):
    model, processor = tiny_retriever
    task = local_retrieval_task(ocr_task_dir)
    task.load_data()
    pages, queries, texts = sample_task(task, n=16)
    assert len(pages) == 16 and len(set(map(len, queries))) > 1 and texts is not None

    bad = check_invariance(model, processor, pages, queries, 8, encode_queries_fn=encode_queries_attending_padding)
    assert not bad.passed and bad.max_score_diff > 1e-4
    with pytest.raises(ColinternError, match=r"batch invariance FAILED: 16 queries x 16 pages at batch 1 and batch "
                                             r"8: largest score difference [0-9.e-]+ \(tolerance 0\.0001"):  # fmt: skip
        bad.raise_if_failed()

    # the production encoders, pages with text of different lengths left-padded in one batch: invariant
    good = check_invariance(model, processor, pages, queries, 8, texts=texts, max_text_tokens=32)
    assert good.passed and good.max_score_diff <= 1e-4, good.line()
    assert encode_pages(model, processor, pages[:2], texts=texts[:2])[0].shape[0] > 16  # text tokens were kept
