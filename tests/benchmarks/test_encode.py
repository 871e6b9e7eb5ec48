"""The encode benchmark runs on tiny inputs and writes its JSON; the --full-size code path runs on a tiny spec."""

import json

import pytest
import torch

from colintern.benchmarks.encode import EncodeRun, benchmark_encode
from colintern.benchmarks.full_size import tiny_config
from scripts.benchmark import build_parser
from scripts.benchmark import main as benchmark_main


def test_quick_encode_benchmark_writes_throughput_per_batch_size(tmp_path, tiny_model_dir, small_synthdocs_dir):
    args = build_parser().parse_args([
        "encode", "--quick", "--model", str(tiny_model_dir), "--dataset", str(small_synthdocs_dir),
        "--device", "cpu", "--repeats", "2", "--output-dir", str(tmp_path),
    ])
    assert benchmark_main(args) == 0
    result = json.loads((tmp_path / "encode.json").read_text())
    assert [row["batch_size"] for row in result["pages"]] == [1, 4]
    assert [row["batch_size"] for row in result["queries"]] == [1, 8]
    for row in result["pages"]:
        assert row["pages_per_second"] > 0 and row["reference_per_second"] > 0
        assert row["speedup_vs_mteb_colpali_wrapper"] > 0 and row["model_tflops_per_second"] > 0
    assert result["tiles_per_page"] == 1 and result["forward_gflop_per_page"] > 0
    assert result["best_pages_per_second"] == max(r["pages_per_second"] for r in result["pages"])
    # two interleaved rounds per batch size: the median round counts, with its spread and the conditions
    for row in result["pages"] + result["queries"]:
        assert len(row["seconds_per_round"]) == 2 and len(row["reference_seconds_per_round"]) == 2
        assert row["seconds"] == pytest.approx(sum(row["seconds_per_round"]) / 2)  # median of two
        assert row["speedup_vs_mteb_colpali_wrapper"] == pytest.approx(
            sum(row["reference_seconds_per_round"]) / sum(row["seconds_per_round"]))
        assert row["spread"] >= 0 and row["peak_memory_mib"] is not None
    assert result["conditions"] == "quiet" or result["conditions"].startswith("under load (load avg ")


def test_full_size_path_runs_on_a_scaled_down_config():
    config = tiny_config()  # 56px tiles of 14px patches: 4 image tokens per tile
    plan = EncodeRun(
        full_size=True, model_config=config, device="cpu", n_pages=3, n_queries=3, page_batch_sizes=(2,),
        query_batch_sizes=(3,), repeats=1, reference=False, page_size=(112, 150), peak_tflops=1.0,
    )
    figures = benchmark_encode(plan)
    assert figures["model"]["architecture"].startswith("scaled-down")
    assert figures["model"]["spec"]["image_seq_length"] == 4
    assert figures["tiles_per_page"] > 1 and figures["dtype"] == "float32" and figures["attn_implementation"] == "sdpa"
    page_row = figures["pages"][0]
    assert page_row["pages_per_second"] > 0 and page_row["mfu"] > 0 and page_row["mfu_end_to_end"] > 0
    # MFU = model FLOPs / time / peak, over the model-only time and over the end-to-end time (timings themselves are
    # not compared: on a shared CPU either pass can be the slower one at this size)
    flops = figures["forward_gflop_per_page"] * 1e9 * 3
    assert page_row["mfu"] == pytest.approx(flops / page_row["model_seconds"] / 1e12)
    assert page_row["mfu_end_to_end"] == pytest.approx(flops / page_row["seconds"] / 1e12)
    assert figures["queries"][0]["queries_per_second"] > 0


def test_full_size_uses_the_shipped_internvl3_5_1b_config_and_its_numbers():
    from transformers.models.internvl import InternVLModel

    from colintern.benchmarks.full_size import full_size_config
    from colintern.model.architecture import InternVLArchitecture

    config = full_size_config()
    architecture = InternVLArchitecture.from_config(config)  # the FLOP formula's numbers are the shipped config's
    assert architecture.image_seq_length == 256 and architecture.vision.patches_per_tile == 1024
    vision = architecture.vision
    assert (vision.layers, vision.hidden, vision.intermediate) == (24, 1024, 4096)
    assert (architecture.text.layers, architecture.text.hidden, architecture.text.q_dim, architecture.text.kv_dim,
            architecture.text.intermediate, architecture.text.vocab) == (28, 1024, 2048, 1024, 3072, 151_936)
    with torch.device("meta"):
        model = InternVLModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.85e9 < n_params < 0.95e9  # 0.91B: InternViT-300M + projector + Qwen3-0.6B, no LM head
