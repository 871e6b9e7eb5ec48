"""The grad-cache benchmark: real tiny training steps, measured against the memory model's prediction."""

from __future__ import annotations

import argparse
import json

from colintern.benchmarks.grad_cache import add_arguments, run


def test_a_cached_step_peaks_near_the_plain_step_of_its_chunk_and_the_model_predicts_both(colintern_home, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--batch-sizes", "16", "--chunk", "4", "--plain-sizes", "4", "16", "--repeats", "0"])
    args.output_dir = tmp_path
    assert run(args) == 0
    figures = json.loads((tmp_path / "grad-cache.json").read_text())
    rows = {(row["in_batch"], row["step"]): row for row in figures["rows"]}
    plain4, plain16, cached16 = rows[4, "plain"], rows[16, "plain"], rows[16, "cached"]
    # 16 pairs in chunks of 4 need much less than 16 pairs at once, and not much more than 4 pairs at once
    assert cached16["measured_peak_bytes"] < 0.6 * plain16["measured_peak_bytes"]
    assert cached16["measured_peak_bytes"] < 1.5 * plain4["measured_peak_bytes"]
    for row in (plain4, plain16, cached16):
        assert abs(row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1) < 0.15, row
    assert figures["target_met_measured"]["in_batch"] == 16
