"""The training report on gradient-cache runs: the in-batch size is the per-device batch, not the chunk."""

from colintern.reports.training import read_run_settings, training_report
from tests.reports.test_training_report import write_run


def test_a_cached_run_is_not_called_small_and_says_so(tmp_path):
    run_dir = write_run(tmp_path / "cached", lambda s: 2.0 * 0.999**s, epochs=1, steps_per_epoch=200, batch_size=128,
                        config={"training": {"lr": 5e-5, "batch_size": 128, "grad_accum": 1, "cache_chunk_size": 16}})
    settings = read_run_settings(run_dir)
    assert settings.cache_chunk_size == 16 and settings.in_batch_documents == 128
    report = training_report(run_dir)
    assert "small_effective_batch" not in report.kinds
    assert "in-batch 128 through the gradient cache, chunks of 16" in report.to_text()


def test_a_small_batch_is_pointed_at_the_gradient_cache(tmp_path):
    run_dir = write_run(tmp_path / "small", lambda s: 2.0 * 0.999**s, epochs=1, steps_per_epoch=200, batch_size=16,
                        config={"training": {"lr": 5e-5, "batch_size": 16, "grad_accum": 1}})
    finding = next(f for f in training_report(run_dir).findings if f.kind == "small_effective_batch")
    assert "--batch-size 64 --cache-chunk-size 16" in finding.suggestion and "adds no negatives" in finding.suggestion
