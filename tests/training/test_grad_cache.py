"""Gradient cache: parameter gradients equal those of one step with a graph over the whole batch (tiny model, float32)."""

import json

import pytest
import torch

from colintern.training.grad_cache import RandomState, check_cache_chunk_size, split_batch
from colintern.training.trainer import build_loss, build_trainer, train
from colintern.utils import ColinternError
from tests.grad_cache_check import batch, chunked_graph_step, gradients, max_difference, tiny_config
from tests.training.test_distributed import torchrun

TOLERANCE = 1e-5


def prepared(tmp_path, dataset, negatives=False, **options):
    """A Trainer ready for single steps; with `negatives`, the hard-negative loss (batches get negatives by hand)."""
    trainer = build_trainer(tiny_config(tmp_path / "run", dataset, **options), save_checkpoints=False).trainer
    if negatives:
        trainer.loss_fn = build_loss("negative-ce")
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    return trainer


def step(trainer, inputs, chunk):
    def run():
        trainer.cache_chunk_size = chunk
        return trainer.training_step(trainer.model, dict(inputs))
    return run


@pytest.mark.parametrize("negatives", [False, True], ids=["in-batch", "hard-negatives"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_without_dropout_the_cached_step_equals_the_plain_step(colintern_home, small_synthdocs_dir, tmp_path,
                                                              negatives, lora):
    trainer = prepared(tmp_path, small_synthdocs_dir, dropout=0.0, lora=lora,
                       negatives=negatives)
    inputs = batch(trainer, range(8), negatives)
    plain = gradients(trainer, step(trainer, inputs, None))
    cached = gradients(trainer, step(trainer, inputs, 3))  # chunks of 3, 3, 2
    assert max(float(g.abs().max()) for g in plain.values()) > 1e-4  # a real gradient
    assert max_difference(cached, plain) <= TOLERANCE


@pytest.mark.parametrize("negatives", [False, True], ids=["in-batch", "hard-negatives"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_with_lora_dropout_the_cached_step_replays_the_masks(colintern_home, small_synthdocs_dir, tmp_path, negatives,
                                                             checkpointing, monkeypatch):
    """LoRA dropout 0.1: the reference draws its masks over the same forward passes in one graph (an un-chunked
    forward would draw different masks: a different random sample, not a different gradient rule)."""
    trainer = prepared(tmp_path, small_synthdocs_dir, dropout=0.1, gradient_checkpointing=checkpointing,
                       negatives=negatives)
    inputs = batch(trainer, range(8), negatives)
    reference = gradients(trainer, lambda: chunked_graph_step(trainer, trainer.model, dict(inputs), 3))
    cached = gradients(trainer, step(trainer, inputs, 3))
    assert max_difference(cached, reference) <= TOLERANCE
    # the masks matter: without dropout the gradients differ, and so they do when the second pass draws new masks
    dropouts = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts
    for module in dropouts:
        module.p = 0.0
    no_dropout = gradients(trainer, lambda: chunked_graph_step(trainer, trainer.model, dict(inputs), 3))
    for module in dropouts:
        module.p = 0.1
    assert max_difference(reference, no_dropout) > 1e-4
    monkeypatch.setattr(RandomState, "replay", lambda self: torch.random.fork_rng())
    assert max_difference(gradients(trainer, step(trainer, inputs, 3)), reference) > 1e-4


def test_split_batch_keeps_each_rows_tiles_and_negatives(colintern_home, small_synthdocs_dir, tmp_path):
    trainer = prepared(tmp_path, small_synthdocs_dir, negatives=True)
    inputs = batch(trainer, range(7), True)
    from colintern.training.grad_cache import _image_token_id

    chunks, n_negatives = split_batch(inputs, 3, _image_token_id(trainer))
    assert n_negatives == 1 and [c["query_"]["input_ids"].shape[0] for c in chunks] == [3, 3, 1]
    for prefix in ("query_", "doc_", "neg_doc_"):
        for key in ("input_ids", "pixel_values"):
            if f"{prefix}{key}" in inputs:
                torch.testing.assert_close(torch.cat([c[prefix][key] for c in chunks]), inputs[f"{prefix}{key}"])


def test_chunk_size_is_checked_against_the_batch(tmp_path, small_synthdocs_dir):
    check_cache_chunk_size(None, 4)
    check_cache_chunk_size(4, 4)
    for bad in (0, 5):
        with pytest.raises(ColinternError, match="--cache-chunk-size"):
            check_cache_chunk_size(bad, 4)


def test_cached_run_trains_evaluates_and_resumes(colintern_home, small_synthdocs_dir, tmp_path):
    from tests.training.test_trainer import SignalAtStep, adapter_weights, small_run

    options = {"batch_size": 6, "cache_chunk_size": 4, "eval_steps": 3}
    straight = train(small_run(tmp_path, small_synthdocs_dir, name="straight", **options))
    assert straight.global_step == 6
    state = json.loads((straight.output_dir / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])  # evaluated through the chunked loss
    stopped = train(small_run(tmp_path, small_synthdocs_dir, name="cut", **options), callbacks=[SignalAtStep(3)])
    assert stopped.interrupted and stopped.global_step == 3
    resumed = train(small_run(tmp_path, small_synthdocs_dir, name="cut", resume="latest", **options))
    assert resumed.global_step == 6 and not resumed.interrupted
    expected, got = adapter_weights(straight.output_dir), adapter_weights(resumed.output_dir)
    assert expected.keys() == got.keys()
    difference = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    # Once recorded as an xfail (1.8e-3 off on the head bias under pytest); it passes under pytest now, with 1 and 2
    # threads alike, so the equality is asserted.
    assert difference <= 1e-5, f"cached resume differs from the straight run by {difference:.3g}"


def test_two_gloo_ranks_cached_gradients_equal_the_reference(colintern_home, small_synthdocs_dir, tmp_path):
    out = tmp_path / "grad_cache.json"
    done = torchrun("tests/grad_cache_check.py", str(small_synthdocs_dir), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        results = json.loads(out.with_name(f"{out.name}.{rank}").read_text())
        assert len(results) == 4
        assert all(difference <= TOLERANCE for difference in results.values()), results
