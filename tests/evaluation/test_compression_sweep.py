"""Compressed scoring through mteb (the wrapper, evaluate(), scripts/evaluate.py) and scripts/compression_sweep.py,
with the shipped trained tiny model on a small SynthDocs corpus."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from colintern.evaluation import evaluate
from colintern.evaluation.compression_sweep import FILES, compression_sweep, pareto_front
from colintern.model.compression import CompressionConfig
from colintern.model.embedded import PRETRAINED_MODEL
from colintern.utils import ColinternError
from tests.pdf_fixtures import run_script_in_process, tree_hashes


@pytest.fixture(scope="module")
def baseline(small_synthdocs_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("mteb_results")
    return output, evaluate(PRETRAINED_MODEL, [str(small_synthdocs_dir)], output_dir=output, show_progress=False)


def test_a_task_scored_compressed_records_its_settings_with_the_results(small_synthdocs_dir, baseline, caplog):
    output, plain = baseline
    config = CompressionConfig(pool_factor=2, quantization="int8")
    with caplog.at_level("INFO"):
        summary = evaluate(PRETRAINED_MODEL, [str(small_synthdocs_dir)], output_dir=output, show_progress=False,
                           compression=config)
    # mteb files the results under experiments/<settings>/, next to (not over) the float16 results
    assert summary.results_dir == plain.results_dir / "experiments" / "pool_factor_2__quantization_int8"
    assert (plain.results_dir / "SynthDocsRetrieval.json").is_file()
    assert (summary.results_dir / "SynthDocsRetrieval.json").is_file()
    meta = json.loads((summary.results_dir / "model_meta.json").read_text())
    assert meta["experiment_kwargs"] == {"pool_factor": 2, "quantization": "int8"}
    # 16 vectors of 128 dims a page: float16 4096 bytes; pooled to 8 vectors of 128 + 2 bytes
    assert "compression pool=2,quant=int8, 1040.0 bytes per page (0.2539 of float16's 4096.0)" in caplog.text
    full, compressed = plain.score("SynthDocsRetrieval"), summary.score("SynthDocsRetrieval")
    assert full > 0.3 and abs(compressed - full) < 0.15  # a trained model, still retrieving when compressed


def test_the_evaluate_script_takes_a_compression_setting(small_synthdocs_dir, baseline, capsys):
    output, plain = baseline
    code = run_script_in_process("scripts/evaluate.py", "--model-path", PRETRAINED_MODEL, "--benchmarks",
                                 str(small_synthdocs_dir), "--output-dir", str(output), "--no-progress",
                                 "--compression", "quant=binary,rescore=24")
    assert code == 0
    folder = plain.results_dir / "experiments" / "quantization_binary__rescore_24"
    result = json.loads((folder / "SynthDocsRetrieval.json").read_text())
    # every one of the 24 pages re-scored with its float16 vectors: the float16 ranking, so the float16 scores
    expected = json.loads((plain.results_dir / "SynthDocsRetrieval.json").read_text())
    assert result["scores"]["test"][0]["ndcg_at_5"] == pytest.approx(expected["scores"]["test"][0]["ndcg_at_5"])
    code = run_script_in_process("scripts/evaluate.py", "--model-path", PRETRAINED_MODEL, "--benchmarks",
                                 str(small_synthdocs_dir), "--output-dir", str(output), "--compression", "quant=int4")
    assert code == 2 and "quantization must be one of float16, int8, binary" in capsys.readouterr().err


def test_the_sweep_writes_table_json_and_png_and_never_overwrites(small_synthdocs_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    result = compression_sweep(PRETRAINED_MODEL, str(small_synthdocs_dir), out, show_progress=False,
                               settings=["pool=2", "dim=32,quant=int8", "quant=binary", "quant=binary,rescore=24"])
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    data = json.loads((out / "sweep.json").read_text())
    rows = {row["setting"]: row for row in data["settings"]}
    assert list(rows) == ["none", "pool=2", "dim=32,quant=int8", "quant=binary", "quant=binary,rescore=24"]
    assert data["encoded"] == {"pages": 24, "queries": 24}  # encoded once for the five settings
    assert rows["none"]["bytes_per_page"] == rows["none"]["float16_bytes_per_page"] == 16 * 128 * 2
    assert rows["pool=2"]["bytes_per_page"] == 8 * 128 * 2
    assert rows["dim=32,quant=int8"]["bytes_per_page"] == 16 * (32 + 2)
    assert rows["quant=binary"]["bytes_per_page"] == 16 * 16 and rows["quant=binary"]["rescore_bytes_per_page"] == 0
    assert rows["quant=binary,rescore=24"]["rescore_bytes_per_page"] == 16 * 128 * 2
    assert rows["quant=binary,rescore=24"]["ndcg_at_5"] == pytest.approx(rows["none"]["ndcg_at_5"])
    assert rows["none"]["kept_ndcg_at_5"] == 1.0
    assert rows["quant=binary,rescore=24"]["pareto_index"] and not rows["quant=binary,rescore=24"]["pareto_total"]
    assert result.baseline.ndcg_at_5 == rows["none"]["ndcg_at_5"]
    table = (out / "table.md").read_text()
    assert "| `quant=binary` | 16.0 | 256.0 | 0.0625 |" in table and "Target (>= 97% of the float16 NDCG@5" in table
    with Image.open(out / "quality_vs_storage.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000

    before = tree_hashes(out)
    with pytest.raises(ColinternError, match="already exists: the sweep never overwrites results"):
        compression_sweep(PRETRAINED_MODEL, str(small_synthdocs_dir), out, settings=["pool=2"])
    code = run_script_in_process("scripts/compression_sweep.py", "--model", PRETRAINED_MODEL, "--task",
                                 str(small_synthdocs_dir), "--output-dir", str(out), "--settings", "pool=2")
    assert code == 2 and "never overwrites" in capsys.readouterr().err
    assert tree_hashes(out) == before


def test_the_sweep_script_end_to_end_and_its_bad_input(small_synthdocs_dir, tmp_path, capsys):
    out = tmp_path / "from-script"
    code = run_script_in_process("scripts/compression_sweep.py", "--model", PRETRAINED_MODEL, "--task",
                                 str(small_synthdocs_dir), "--output-dir", str(out), "--no-progress",
                                 "--settings", "dim=64")
    assert code == 0
    printed = capsys.readouterr().out
    assert "| `dim=64` | 16.0 | 2048.0 | 0.5000 |" in printed
    assert "python scripts/compression_sweep.py --model embedded:tiny-internvl3_5-pretrained" in printed
    assert json.loads((out / "sweep.json").read_text())["command"].endswith("--settings dim=64")
    code = run_script_in_process("scripts/compression_sweep.py", "--model", PRETRAINED_MODEL, "--task",
                                 str(small_synthdocs_dir), "--output-dir", str(tmp_path / "bad"), "--settings", "pool=")
    assert code == 2 and "'pool=' is not KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_pareto_front():
    points = [(100, 0.5), (50, 0.5), (50, 0.4), (10, 0.3), (200, 0.6), (300, 0.55)]
    assert pareto_front(points) == [False, True, False, True, True, False]
