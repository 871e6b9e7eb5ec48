"""Training on the tiny real model and a small real SynthDocs folder (in-process where possible, for speed)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from colintern.training.arguments import RunConfig
from colintern.training.trainer import (
    NonFiniteLossError,
    build_model,
    build_optimizer,
    compact_multivectors,
    parameter_groups,
    train,
    trainable_parameter_names,
)
from colintern.utils import ColinternError

from tests.conftest import REPO_ROOT


def small_run(tmp_path, dataset, name="run", **training) -> RunConfig:
    config = RunConfig.from_dict(
        {
            "model": {"name_or_path": "embedded:tiny-internvl3_5", "max_num_visual_tokens": 16, "dtype": "float32"},
            "data": {"dataset": str(dataset), "eval_split": "validation", "max_eval_samples": 8},
            "lora": {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.1},
            "training": {
                "output_dir": str(tmp_path / name), "max_steps": 6, "batch_size": 4, "grad_accum": 1, "lr": 2e-3,
                "warmup_steps": 1, "save_steps": 2, "eval_steps": 100, "logging_steps": 1, "report_to": "none",
                "gradient_checkpointing": False, "dataloader_num_workers": 0, "seed": 3, **training,
            },
        }
    )
    return config


def adapter_weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


def saved_weights(path, peft: bool):
    """The trained weights a run or checkpoint folder holds: the adapter (LoRA) or the whole model (full training)."""
    return load_file(str(path / ("adapter_model.safetensors" if peft else "model.safetensors")))


def test_compact_multivectors_keeps_real_tokens_and_never_adds_a_new_max():
    x = torch.zeros(2, 6, 4)
    x[0, 2:5] = torch.nn.functional.normalize(-torch.rand(3, 4), dim=-1)  # 3 real tokens, all negative
    x[1, 1:] = torch.nn.functional.normalize(torch.rand(5, 4), dim=-1)  # 5 real tokens
    out = compact_multivectors(x)
    assert out.shape == (2, 5, 4)
    assert torch.equal(out[1], x[1, 1:])
    assert torch.equal(out[0, :3], x[0, 2:5]) and torch.equal(out[0, 3:], x[0, 2:4])  # padding repeats real tokens
    q = torch.ones(1, 4)
    assert torch.allclose((q @ out[0].T).max(), (q @ x[0, 2:5].T).max())


def test_peft_trains_only_language_model_lora_and_the_head(colintern_home, small_synthdocs_dir, tmp_path):
    model, _ = build_model(small_run(tmp_path, small_synthdocs_dir))
    names = trainable_parameter_names(model)
    assert names, "nothing is trainable"
    lora = [n for n in names if "lora_" in n]
    head = [n for n in names if "custom_text_proj" in n]
    assert set(names) == set(lora) | set(head)
    assert all(re.search(r"language_model\.layers\.\d+\.(self_attn|mlp)\.", n) for n in lora)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in head} == {"weight", "bias"} and len(head) == 2
    groups = parameter_groups(model, small_run(tmp_path, small_synthdocs_dir, lr_head=1e-2))
    assert {g["name"]: g["lr"] for g in groups} == {"lora_or_language_model": 2e-3, "head": 1e-2}


def test_full_finetuning_with_and_without_the_vision_tower(colintern_home, small_synthdocs_dir, tmp_path):
    config = small_run(tmp_path, small_synthdocs_dir)
    config.lora.enabled = False
    names = trainable_parameter_names(build_model(config)[0])
    assert any(n.startswith("language_model.") for n in names) and "custom_text_proj.weight" in names
    assert not any(n.startswith(("vision_tower", "multi_modal_projector")) for n in names)
    config.training.train_vision = True
    config.training.lr_vision = 1e-4
    model = build_model(config)[0]
    assert any(n.startswith("vision_tower") for n in trainable_parameter_names(model))
    lrs = {g["name"]: g["lr"] for g in parameter_groups(model, config)}
    assert lrs == {"lora_or_language_model": 2e-3, "head": 2e-3, "vision": 1e-4}


class HeadSteps(TrainerCallback):
    """Per optimizer step: the learning rate, and the trained head's weight before, its gradient, and after."""

    def __init__(self):
        self.steps: list[dict] = []

    @staticmethod
    def _head(model):
        return next(p for n, p in model.named_parameters() if "custom_text_proj" in n and n.endswith("weight")
                    and p.requires_grad)

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        head = self._head(model)
        self.steps.append({"lr": lr_scheduler.get_last_lr()[0], "before": head.detach().clone(),
                           "grad": head.grad.detach().clone()})

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps[-1]["after"] = self._head(model).detach().clone()


def _moved_fraction(step: dict) -> float:
    """Of the head weights with a gradient, the fraction this optimizer step changed."""
    has_gradient = step["grad"] != 0
    # bf16 compute gives a handful of exactly-zero gradients (13 of 16,384 on this CPU): nothing can move those
    assert has_gradient.float().mean() > 0.99
    return float((step["after"] != step["before"])[has_gradient].float().mean())


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_trained_weights_stay_float32_under_a_bf16_load_and_every_head_weight_moves(
    colintern_home, small_synthdocs_dir, tmp_path, peft
):
    """bf16 weights cannot take a small AdamW step (before the fix one step at lr 5e-5 changed 56% of the head's
    weights, 1% at 5e-7): whatever trains keeps float32 master weights, compute is bf16 autocast."""
    from PIL import Image

    from colintern.model.encoding import encode_pages

    config = small_run(tmp_path, small_synthdocs_dir, max_steps=2, warmup_steps=0, lr=5e-5, save_steps=100,
                       eval_steps=2, bf16="true")
    config.model.dtype = "bfloat16"
    config.lora.enabled = peft
    config.training.train_vision = not peft
    model, processor = build_model(config)
    optimizer = build_optimizer(model, config)
    assert {p.dtype for group in optimizer.param_groups for p in group["params"]} == {torch.float32}
    # the mixed model runs without autocast too (--dtype bfloat16 --bf16 false; encoding outside the Trainer)
    assert torch.isfinite(encode_pages(model, processor, [Image.new("RGB", (128, 176), "navy")])[0]).all()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("custom_text_proj" in n for n in trained)
    assert any(("lora_" if peft else "vision_tower") in n for n in trained)
    frozen = {p.dtype for n, p in model.named_parameters() if n not in trained}  # none left in full + vision
    assert frozen == ({torch.bfloat16} if peft else set()), "frozen weights keep the load dtype"
    del model, optimizer

    steps = HeadSteps()
    result = train(config, callbacks=[steps])
    first = steps.steps[0]
    assert first["lr"] == pytest.approx(5e-5) and first["before"].dtype == torch.float32
    # AdamW's first step moves every weight with a gradient by ~lr (about 2,000 float32 ulps of a 0.02 weight)
    assert _moved_fraction(first) == 1.0
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    assert all(math.isfinite(e["loss"]) for e in state["log_history"] if "loss" in e)
    assert any("eval_loss" in entry for entry in state["log_history"]), "the bf16 evaluation ran"

    # during warm-up (the second step of 100 runs at lr 5e-7; the first at 0): Adam's momentum from the first
    # gradient can cancel a rare update to below a float32 ulp (about 1 in 1,000 at 5e-7); in bf16 only 1% moved
    warm = small_run(tmp_path, small_synthdocs_dir, name="warm", max_steps=2, warmup_steps=100, lr=5e-5,
                     eval_steps=None, bf16="true")
    warm.model.dtype, warm.lora.enabled, warm.training.train_vision = "bfloat16", peft, not peft
    warm_steps = HeadSteps()
    train(warm, callbacks=[warm_steps])
    assert [s["lr"] for s in warm_steps.steps] == pytest.approx([0.0, 5e-7])
    assert _moved_fraction(warm_steps.steps[1]) > 0.99  # 99.88% measured

    # what was saved loads in bf16 and embeds like the trained model (fp32 masters saved, rounded to bf16 on load)
    from colintern.model.loading import load_retriever

    saved = load_file(str(result.output_dir / ("adapter_model.safetensors" if peft else "model.safetensors")))
    head = next(v for k, v in saved.items() if "custom_text_proj" in k and k.endswith("weight"))
    assert head.dtype == torch.float32 and torch.equal(head, steps.steps[-1]["after"])  # saved as trained
    reloaded, processor = load_retriever(str(result.output_dir), device="cpu", dtype=torch.bfloat16)
    assert not reloaded.head_is_untrained() and reloaded.custom_text_proj.weight.dtype == torch.bfloat16
    reference, _ = load_retriever(str(result.output_dir), device="cpu", dtype=torch.float32)
    pages = [Image.new("RGB", (128, 176), "navy")]
    got = encode_pages(reloaded, processor, pages, storage_dtype=torch.float32)[0]
    expected = encode_pages(reference, processor, pages, storage_dtype=torch.float32)[0]
    assert torch.isfinite(got).all() and torch.nn.functional.cosine_similarity(got, expected, dim=-1).min() > 0.98


def test_adapter_reloads_in_a_fresh_process_with_identical_embeddings(colintern_home, small_synthdocs_dir, tmp_path):
    from PIL import Image

    from colintern.model.encoding import encode_pages, encode_queries

    config = small_run(tmp_path, small_synthdocs_dir, max_steps=3)
    result = train(config)
    out = result.output_dir
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "processor_config.json").is_file() and (out / "colintern_run.json").is_file()
    assert (out / "trainer_state.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded:tiny-internvl3_5"
    assert any("custom_text_proj" in k for k in adapter_weights(out)), "the head must be saved inside the adapter"

    # embeddings of the trained model, in memory
    from colintern.training.trainer import build_model as _  # noqa: F401 - same process, model state from train()
    from colintern.model.loading import load_retriever

    pages = [Image.new("RGB", (128, 176), c) for c in ("red", "teal")]
    queries = ["red header with a pie chart", "a table"]
    torch.save({"pages": pages, "queries": queries}, tmp_path / "inputs.pt")
    model, processor = load_retriever(str(out), device="cpu")  # same loader, this process
    expected_pages = encode_pages(model, processor, pages, storage_dtype=torch.float32)
    expected_queries = encode_queries(model, processor, queries, storage_dtype=torch.float32)
    assert not model.head_is_untrained()

    script = (
        "import sys, torch\n"
        "from colintern.model.loading import load_retriever\n"
        "from colintern.model.encoding import encode_pages, encode_queries\n"
        "inputs = torch.load(sys.argv[2], weights_only=False)\n"
        "model, processor = load_retriever(sys.argv[1], device='cpu')\n"
        "torch.save({'pages': encode_pages(model, processor, inputs['pages'], storage_dtype=torch.float32),\n"
        "            'queries': encode_queries(model, processor, inputs['queries'], storage_dtype=torch.float32)},\n"
        "           sys.argv[3])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "emb.pt")],
                   check=True, env=env, capture_output=True)
    fresh = torch.load(tmp_path / "emb.pt")
    for a, b in zip(expected_pages + expected_queries, fresh["pages"] + fresh["queries"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_trained_in_memory_model_matches_the_saved_adapter(colintern_home, small_synthdocs_dir, tmp_path):
    from PIL import Image

    from colintern.model.loading import load_retriever
    from colintern.model.encoding import encode_pages

    captured = {}

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            captured["model"], captured["processor"] = model, processing_class

    result = train(small_run(tmp_path, small_synthdocs_dir, max_steps=2), callbacks=[Capture()])
    pages = [Image.new("RGB", (128, 176), "navy")]
    # eval mode (LoRA dropout off): a run without a final evaluation ends with the model in train mode
    in_memory = encode_pages(captured["model"].eval(), captured["processor"], pages, storage_dtype=torch.float32)
    reloaded, processor = load_retriever(str(result.output_dir), device="cpu")
    torch.testing.assert_close(in_memory[0], encode_pages(reloaded, processor, pages, storage_dtype=torch.float32)[0],
                               rtol=1e-5, atol=1e-6)


class SignalAtStep(TrainerCallback):
    """Sends this process a real SIGTERM while step `step` runs, as a cluster scheduler would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:  # global_step counts finished steps
            os.kill(os.getpid(), signal.SIGTERM)


def full_run(tmp_path, dataset, name="run", **training) -> RunConfig:
    """small_run with full fine-tuning, the vision tower included, as the demo preset trains."""
    config = small_run(tmp_path, dataset, name=name, **training)
    config.lora.enabled = False
    config.training.train_vision = True
    return config


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(colintern_home, small_synthdocs_dir, tmp_path, peft):
    run = small_run if peft else full_run
    weights_file = "adapter_model.safetensors" if peft else "model.safetensors"
    reference = train(run(tmp_path, small_synthdocs_dir, name="straight"))
    assert reference.global_step == 6 and not reference.interrupted

    stopped = train(run(tmp_path, small_synthdocs_dir, name="killed"), callbacks=[SignalAtStep(3)])
    assert stopped.interrupted and stopped.global_step == 3
    assert (stopped.output_dir / "checkpoint-3" / weights_file).is_file()
    assert not (stopped.output_dir / weights_file).exists()  # no "final" adapter from a cut run

    resumed = train(run(tmp_path, small_synthdocs_dir, name="killed", resume="latest"))
    assert resumed.global_step == 6 and not resumed.interrupted
    expected, got = saved_weights(reference.output_dir, peft), saved_weights(resumed.output_dir, peft)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    if not peft:
        # Full training on the CPU resumes bit for bit (the language model used to restart from its initial weights,
        # 1.2e-3 off after 12 demo steps); checked on every tensor, the language model's included.
        assert any(key.startswith("language_model.") for key in expected)
        assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(colintern_home, small_synthdocs_dir, tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "embed_tokens" in n).fill_(float("nan"))

    config = small_run(tmp_path, small_synthdocs_dir, name="nan")
    with pytest.raises(NonFiniteLossError, match="checkpoint-2"):
        train(config, callbacks=[Poison()])
    good = adapter_weights(tmp_path / "nan" / "checkpoint-2")
    assert all(torch.isfinite(v).all() for v in good.values())
    # the failure is on record for scripts/training_report.py
    from colintern.reports.training import training_report

    kinds = {finding.kind for finding in training_report(tmp_path / "nan").findings}
    assert "nan" in kinds


class CountEvaluations(TrainerCallback):
    def __init__(self):
        self.at_steps: list[int] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.at_steps.append(state.global_step)


def test_a_smoke_run_skips_evaluation_and_evaluate_names_the_unfinished_warm_up(
    colintern_home, small_synthdocs_dir, tmp_path
):
    from colintern.model.checkpoints import check_trained_head, describe_checkpoint
    from colintern.model.loading import load_retriever

    # transformers adds a final evaluation to any run with step-based evaluation; one shorter than --eval-steps skips it
    smoke, evaluations = small_run(tmp_path, small_synthdocs_dir, name="smoke", max_steps=1, warmup_steps=10,
                                   eval_steps=100, retrieval_eval=True), CountEvaluations()
    out = train(smoke, callbacks=[evaluations]).output_dir
    assert evaluations.at_steps == []
    # a longer run keeps its scheduled evaluation and the one at its end
    longer = CountEvaluations()
    train(small_run(tmp_path, small_synthdocs_dir, name="longer", max_steps=3, eval_steps=2, save_steps=100),
          callbacks=[longer])
    assert longer.at_steps == [2, 3]

    # the head never moved (lr 0 at the first warm-up step): evaluate.py says why, and what to do
    done = run_script("scripts/evaluate.py", "--model-path", str(out), "--benchmarks", str(small_synthdocs_dir / "test"),
                      "--output-dir", str(tmp_path / "eval"), "--max-num-visual-tokens", "16")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert re.search(r"the run ended before its warm-up finished \(1 step, warm-up 10\).*--max-steps above 10.*"
                     r"--allow-untrained-head", done.stderr), done.stderr[-2000:]
    checkpoint = out / "checkpoint-1"
    model, _ = load_retriever(str(checkpoint), device="cpu")
    with pytest.raises(ColinternError, match=r"saved before the run's warm-up finished \(1 step, warm-up 10\)"):
        check_trained_head(model, describe_checkpoint(str(checkpoint)))
    check_trained_head(model, describe_checkpoint(str(checkpoint)), allow_untrained_head=True)


class HugeLearningRateFrom(TrainerCallback):
    """From step `step` on, the optimizer steps with learning rate `lr` (a divergence forced on a healthy run)."""

    def __init__(self, step: int, lr: float):
        self.step, self.lr = step, lr

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 >= self.step:
            for group in optimizer.param_groups:
                group["lr"] = self.lr


def test_non_finite_loss_names_the_last_healthy_checkpoint_not_the_last_saved(
    colintern_home, small_synthdocs_dir, tmp_path, caplog
):
    from colintern.model.checkpoints import last_healthy_checkpoint, list_checkpoints
    from colintern.reports.training import training_report

    # a checkpoint every step, two kept: rotation must keep the last healthy one, not the two newest
    config = full_run(tmp_path, small_synthdocs_dir, name="diverged", save_steps=1, max_steps=8, save_total_limit=2)
    with pytest.raises(NonFiniteLossError) as stopped, caplog.at_level("WARNING"):
        train(config, callbacks=[HugeLearningRateFrom(3, 1e4)])
    run_dir = tmp_path / "diverged"
    # steps 1-2 train normally; step 3 makes the weights ~1e4 (finite, 1e4x the initial); later ones reach NaN
    assert "checkpoint-3 is not healthy: weights up to" in caplog.text
    kept = list_checkpoints(run_dir)
    assert [c.step for c in kept][0] == 2 and kept[-1].step > 3 and all(c.complete for c in kept)
    assert kept[0].healthy and kept[-1].healthy is False
    assert last_healthy_checkpoint(run_dir).path == run_dir / "checkpoint-2"
    message = str(stopped.value)
    assert f"Last healthy checkpoint: {run_dir / 'checkpoint-2'}" in message
    assert f"--resume {run_dir / 'checkpoint-2'}" in message and f"{kept[-1].path.name} is not" in message
    initial = saved_weights(colintern_home / "tiny-internvl3_5", peft=False)
    good, bad = saved_weights(kept[0].path, peft=False), saved_weights(kept[-1].path, peft=False)
    assert max(v.abs().max().item() for v in good.values()) < 10 * max(v.abs().max().item() for v in initial.values())
    assert not all(torch.isfinite(v).all() for v in bad.values()) or max(v.abs().max() for v in bad.values()) > 1e3
    nan = next(f for f in training_report(run_dir).findings if f.kind == "nan")
    assert "checkpoint-2," in nan.suggestion


@pytest.fixture(scope="module")
def checkpointed_runs(colintern_home, small_synthdocs_dir, tmp_path_factory):
    """A LoRA run and a full-training run of 4 steps with checkpoints at steps 2 and 4 (copy before changing)."""
    root = tmp_path_factory.mktemp("checkpointed")
    for peft, run in ((True, small_run), (False, full_run)):
        assert train(run(root, small_synthdocs_dir, name="lora" if peft else "full", max_steps=4)).global_step == 4
    return root


def copy_run(checkpointed_runs, tmp_path, name):
    import shutil

    return Path(shutil.copytree(checkpointed_runs / name, tmp_path / name))


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("change", ["removed", "added"])
def test_resume_refuses_a_checkpoint_whose_tensors_do_not_match(
    checkpointed_runs, small_synthdocs_dir, tmp_path, peft, change
):
    from safetensors.torch import save_file

    from colintern.model.checkpoints import write_checkpoint_marker

    name = "lora" if peft else "full"
    run_dir = copy_run(checkpointed_runs, tmp_path, name)
    checkpoint = run_dir / "checkpoint-4"
    weights = saved_weights(checkpoint, peft)
    if change == "removed":
        victim = next(k for k in sorted(weights) if "layers.1.mlp.gate_proj" in k)
        del weights[victim]
        expected = r"1 of the (model|adapter)'s \d+ tensors are missing \(.*layers\.1\.mlp\.gate_proj"
    else:
        weights["language_model.model.layers.9.mlp.extra.weight"] = torch.zeros(2)
        expected = r"1 tensors are not the (model|adapter)'s \(language_model\.model\.layers\.9\.mlp\.extra"
    save_file(weights, str(checkpoint / ("adapter_model.safetensors" if peft else "model.safetensors")),
              metadata={"format": "pt"})
    write_checkpoint_marker(checkpoint, 4, {"healthy": True, "problems": []})  # complete, but not this model's
    run = small_run if peft else full_run
    config = run(tmp_path, small_synthdocs_dir, name=name, max_steps=6, resume=str(checkpoint))
    with pytest.raises(ColinternError, match=f"Cannot resume from {re.escape(str(checkpoint))}: .*{expected}"):
        train(config)


def test_resume_latest_skips_incomplete_checkpoints_and_a_named_one_is_refused(checkpointed_runs, tmp_path, caplog):
    from colintern.model.checkpoints import CHECKPOINT_MARKER
    from colintern.training.trainer import resolve_resume

    run_dir = copy_run(checkpointed_runs, tmp_path, "full")
    assert resolve_resume("latest", run_dir) == str(run_dir / "checkpoint-4")
    # a save cut short before its marker
    (run_dir / "checkpoint-4" / CHECKPOINT_MARKER).unlink()
    with caplog.at_level("WARNING"):
        assert resolve_resume("latest", run_dir) == str(run_dir / "checkpoint-2")
    assert f"skipping {run_dir / 'checkpoint-4'}, incomplete (no {CHECKPOINT_MARKER}" in caplog.text
    with pytest.raises(ColinternError, match=r"checkpoint-4: incomplete checkpoint .* Use --resume .*checkpoint-2"):
        resolve_resume(str(run_dir / "checkpoint-4"), run_dir)
    (run_dir / "checkpoint-4" / "trainer_state.json").unlink()  # cut before the Trainer wrote its state
    with pytest.raises(ColinternError, match=r"checkpoint-4: incomplete checkpoint \(no colintern_checkpoint.json"):
        resolve_resume(str(run_dir / "checkpoint-4"), run_dir)
    # a file cut short after the marker was written (a copy interrupted, a full disk)
    optimizer = run_dir / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with pytest.raises(ColinternError, match=r"no complete checkpoint in .*checkpoint-2: optimizer.pt has \d+ bytes"):
        resolve_resume("latest", run_dir)


def test_checkpoints_from_before_markers_are_judged_by_their_files(checkpointed_runs, tmp_path):
    from colintern.model.checkpoints import CHECKPOINT_MARKER
    from colintern.training.trainer import resolve_resume

    run_dir = copy_run(checkpointed_runs, tmp_path, "lora")
    for marker in run_dir.glob(f"checkpoint-*/{CHECKPOINT_MARKER}"):
        marker.unlink()
    assert resolve_resume("latest", run_dir) == str(run_dir / "checkpoint-4")  # every file there and whole
    weights = run_dir / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert resolve_resume("latest", run_dir) == str(run_dir / "checkpoint-2")
    (run_dir / "checkpoint-2" / "rng_state.pth").unlink()
    with pytest.raises(ColinternError, match=r"checkpoint-4: adapter_model.safetensors is cut short.*checkpoint-2: "
                                             r"rng_state.pth missing"):
        resolve_resume("latest", run_dir)


def test_a_run_killed_during_a_save_resumes_from_the_previous_checkpoint(
    colintern_home, small_synthdocs_dir, tmp_path, caplog
):
    config = small_run(tmp_path, small_synthdocs_dir, name="sigkill")
    # SIGKILL once the weights of checkpoint-4 are written, before its optimizer state: a save cut short
    script = (
        "import json, os, signal, sys\n"
        "from transformers import Trainer\n"
        "from colintern.training.arguments import RunConfig\n"
        "from colintern.training.trainer import train\n"
        "save = Trainer._save_optimizer_and_scheduler\n"
        "def killed(self, output_dir):\n"
        "    if self.state.global_step == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return save(self, output_dir)\n"
        "Trainer._save_optimizer_and_scheduler = killed\n"
        "train(RunConfig.from_dict(json.loads(sys.argv[1])))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(config.to_dict())], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    out = tmp_path / "sigkill"
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()  # half there
    config.training.resume_from_checkpoint = "latest"
    with caplog.at_level("INFO"):
        resumed = train(config)
    assert f"skipping {out / 'checkpoint-4'}, incomplete" in caplog.text
    assert f"Resuming from {out / 'checkpoint-2'}" in caplog.text
    assert resumed.global_step == 6 and not resumed.interrupted
    from colintern.model.checkpoints import list_checkpoints

    assert [(c.step, c.complete) for c in list_checkpoints(out)] == [(2, True), (4, True), (6, True)]


def test_the_best_full_model_is_loaded_at_the_end_through_the_key_mapping(
    colintern_home, small_synthdocs_dir, tmp_path
):
    config = full_run(tmp_path, small_synthdocs_dir, name="best", max_steps=4, save_steps=2, eval_steps=2,
                      early_stopping_patience=5, save_total_limit=None)
    captured = {}

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            captured["best"] = state.best_model_checkpoint

    result = train(config, callbacks=[Capture()])
    best = captured["best"]
    # (evaluation loss 1.60 at step 2, 4.27 at step 4 with this seed)
    assert best and not best.endswith("checkpoint-4"), f"the test needs an earlier best checkpoint, got {best}"
    final, expected = saved_weights(result.output_dir, peft=False), saved_weights(Path(best), peft=False)
    assert any(key.startswith("language_model.") for key in expected)
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_resume_latest_without_checkpoints_is_a_clear_error(colintern_home, small_synthdocs_dir, tmp_path):
    with pytest.raises(ColinternError, match="no checkpoint"):
        train(small_run(tmp_path, small_synthdocs_dir, name="fresh", resume="latest"))


def run_script(*args, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO_ROOT)


def test_train_script_writes_a_peft_adapter(colintern_home, small_synthdocs_dir, tmp_path):
    out = tmp_path / "D"
    done = run_script("scripts/train.py", "--preset", "demo", "--peft", "--max-steps", "4", "--output-dir", str(out),
                      "--dataset", str(small_synthdocs_dir), "--batch-size", "4", "--report-to", "wandb")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert list((out / "wandb").glob("offline-run-*")), "W&B should log offline when there is no API key"


def test_real_preset_offline_stops_at_once_naming_the_demo(colintern_home, tmp_path):
    done = run_script("scripts/train.py", "--output-dir", str(tmp_path / "real"), env_extra={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert "--preset demo" in done.stderr and "Traceback" not in done.stderr


def test_a_new_run_never_replaces_another_runs_checkpoints(colintern_home, small_synthdocs_dir, tmp_path):
    # found: a fresh run into a folder holding an earlier run replaced its checkpoint-N folders (same steps) and deleted
    # the rest through --save-total-limit
    first = small_run(tmp_path, small_synthdocs_dir, max_steps=4, save_total_limit=1)
    train(first)
    earlier = {p.name: saved_weights(p, peft=True) for p in (tmp_path / "run").glob("checkpoint-*")}
    assert earlier
    with pytest.raises(ColinternError, match=r"already holds checkpoints of another run.*--resume latest.*--overwrite"):
        train(small_run(tmp_path, small_synthdocs_dir, max_steps=4, save_total_limit=1, seed=4))
    again = small_run(tmp_path, small_synthdocs_dir, max_steps=4, save_total_limit=1, seed=4, overwrite=True)
    train(again)
    (previous,) = (tmp_path / "run").glob("previous-*")
    for name, weights in earlier.items():  # moved aside intact, not deleted
        kept = saved_weights(previous / name, peft=True)
        assert all(torch.equal(kept[key], value) for key, value in weights.items())
