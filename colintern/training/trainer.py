"""Contrastive training of ColIntern3.5 on transformers' Trainer, with colpali-engine's late-interaction losses.

What this adds to a plain Trainer:
  * PEFT done right: LoRA on the language model's attention/MLP linears only, and `custom_text_proj` trained in full
    through peft's `modules_to_save`, so the head is saved inside the adapter (a checkpoint evaluated in a fresh
    process gives exactly the trained model's embeddings; upstream, a LoRA-on-a-random-head adapter evaluates as
    garbage).
  * float32 master weights for whatever trains, whatever the load dtype (bf16 weights cannot take small AdamW
    steps), with bf16 autocast doing the compute.
  * In-batch negatives gathered from every DDP rank (differentiably), hard negatives when the data has them.
  * Page embeddings compacted to their image tokens before the loss, padded by repeating a real token (which never
    changes a max), so padding can never win MaxSim even when every real similarity is negative.
  * Guards: data validated before the first step; a non-finite loss stops before the weights are touched, naming
    the last healthy checkpoint; SIGINT/SIGTERM save a checkpoint and stop cleanly; `--resume latest` continues
    from the newest complete checkpoint (each is marked complete last, with the health of its weights), loading
    the weights through the same key mapping as `from_pretrained` and refusing any missing or unexpected tensor.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from colintern.model.checkpoints import (
    checkpoint_step,
    inspect_checkpoint,
    last_healthy_checkpoint,
    latest_complete_checkpoint,
    list_checkpoints,
    remove_checkpoint_marker,
    write_checkpoint_marker,
)
from colintern.training.arguments import RunConfig
from colintern.utils import RUN_CONFIG_FILE, ColinternError

logger = logging.getLogger(__name__)

NEGATIVE_LOSSES = {"negative-ce", "pairwise-negative-ce"}
# the loss a hard-negative loss falls back to on batches without negatives (the evaluation split has none)
IN_BATCH_EQUIVALENT = {"negative-ce": "colbert", "pairwise-negative-ce": "pairwise"}
# A checkpoint whose largest trainable weight grew more than this factor over the run's initial model is unhealthy
# (a divergence, though still finite). Measured on the demo model (initial max |w| 1.0): lr 1 for 30 steps, far too
# high, ends at 9.1; lr 1e3 and 1e4 reach 1e3 and 1e4 after one step, then NaN.
WEIGHT_GROWTH_LIMIT = 100.0


class NonFiniteLossError(ColinternError):
    """The loss became NaN or infinite; raised before the backward pass so no weight is corrupted."""


# ------------------------------------------------------------------------------------------------ losses
def build_loss(name: str, temperature: float | None = None) -> torch.nn.Module:
    """colpali-engine's late-interaction losses by name (`--loss`; the names: colintern.training.arguments.LOSSES)."""
    import colpali_engine.loss

    from colintern.training.arguments import LOSSES

    if name not in LOSSES:
        raise ColinternError(f"Unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
    # norm_tol: colpali-engine prints a warning when length-normalised scores leave [0, 1]; with exact MaxSim
    # (see compact_multivectors) a query token's best match can be negative, so the valid range is [-1, 1].
    kwargs = {"norm_tol": 1.0} if temperature is None else {"temperature": temperature, "norm_tol": 1.0}
    return getattr(colpali_engine.loss, LOSSES[name])(**kwargs)


def compact_multivectors(embeddings: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Drop absent (all-zero) tokens: (batch, tokens, dim) -> (batch, length, dim).

    Rows shorter than `length` (default: the longest row) are padded by repeating their first real token, which leaves
    every max over tokens unchanged; a zero pad instead scores 0 and wins whenever all real similarities are negative.
    """
    present = embeddings.ne(0).any(dim=-1)  # (batch, tokens)
    counts = present.sum(dim=1)
    length = int(counts.max()) if length is None else length
    if bool((counts == embeddings.shape[1]).all()) and length == embeddings.shape[1]:
        return embeddings
    # order each row's real tokens first (stable), then gather positions, wrapping around the real tokens for padding
    order = torch.sort((~present).to(torch.int8), dim=1, stable=True).indices  # (batch, tokens)
    slots = torch.arange(length, device=embeddings.device)[None, :]
    wrapped = slots % counts.clamp(min=1)[:, None]  # (batch, length)
    index = torch.gather(order, 1, wrapped)
    return torch.gather(embeddings, 1, index[..., None].expand(-1, -1, embeddings.shape[-1]))


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of the *sum* of every rank's loss w.r.t. its own
    input (DDP then averages parameter gradients, giving the gradient of the mean loss).

    Not `torch.distributed.nn.functional.all_gather`, which means to do the same: in torch 2.13 it is deprecated, and
    on gloo its backward (an all_to_all) returns wrong gradients when the incoming gradients are not contiguous, as
    ColbertLoss's are (tests/training/test_distributed.py fails with it)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor):
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        grad = torch.stack(grads).contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_pages(pages: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Page embeddings of every DDP rank, concatenated (gradients flow back to each rank's own pages), and this
    rank's offset into them. Without torch.distributed: (pages, 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return pages, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    length = torch.tensor([pages.shape[1]], device=pages.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    pages = compact_multivectors(pages, int(max(l.item() for l in lengths)))
    return torch.cat(_AllGatherWithGrad.apply(pages), dim=0), rank * pages.shape[0]


# ------------------------------------------------------------------------------------------------ trainer
def _prefixed(inputs: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in inputs.items() if k.startswith(prefix)}


class RetrievalEvaluator:
    """NDCG@5/10 and Recall@100 of the model on a retrieval split (corpus / queries / qrels) during training,
    computed by mteb exactly as the final evaluation is (colintern.evaluation.evaluate_in_memory), no files written."""

    def __init__(self, folder: str | Path, processor, batch_size: int = 32):
        folder = Path(folder)
        self.root, self.split, self.processor, self.batch_size = folder.parent, folder.name, processor, batch_size

    def __call__(self, model) -> dict[str, float]:
        from colintern.evaluation import evaluate_in_memory  # imports mteb: only when evaluating

        scores = evaluate_in_memory(model, self.processor, self.root, split=self.split, batch_size=self.batch_size)
        return {name: round(float(scores[name]), 5) for name in ("ndcg_at_5", "ndcg_at_10", "recall_at_100")}


class ColInternTrainer(Trainer):
    """transformers.Trainer with a late-interaction contrastive loss and retrieval metrics at evaluation."""

    def __init__(self, *args, loss_fn: torch.nn.Module, retrieval_eval=None,
                 in_batch_loss_fn: torch.nn.Module | None = None, cache_chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_chunk_size = cache_chunk_size  # gradient cache (colintern.training.grad_cache) when set
        self.loss_fn = loss_fn
        self.in_batch_loss_fn = in_batch_loss_fn or loss_fn  # for batches without hard negatives
        self.retrieval_eval = retrieval_eval
        # the loss is a mean over the batch: let the Trainer divide by the accumulation steps
        self.model_accepts_loss_kwargs = False
        # health of the steps since the last checkpoint (see `_checkpoint_health`)
        self._initial_max_abs: float | None = None
        self._bad_grad_norms: torch.Tensor | int = 0
        self._grad_norm_step = -1
        self._steps_since_save_from: int | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        query_inputs = _prefixed(inputs, "query_")
        doc_inputs = _prefixed(inputs, "doc_")
        neg_inputs = _prefixed(inputs, "neg_doc_")
        n_negatives = int(neg_inputs.pop("count", 0)) if neg_inputs else 0

        queries = model(**query_inputs)  # (B, Lq, D)
        pages = model(**doc_inputs)  # (B, Lp, D)
        negatives = model(**neg_inputs) if n_negatives else None  # (B * N, Ln, D)
        loss = self.embedding_loss(queries, pages, negatives, n_negatives)
        self.check_finite(loss)
        return (loss, (queries, pages)) if return_outputs else loss

    def embedding_loss(self, queries, pages, negatives=None, n_negatives: int = 0) -> torch.Tensor:
        """The loss from the batch's embeddings as the model returns them, every rank's pages as in-batch negatives."""
        pages = compact_multivectors(pages)
        all_pages, offset = gather_pages(pages)
        if n_negatives:
            negatives = compact_multivectors(negatives)
            negatives = negatives.view(queries.shape[0], n_negatives, *negatives.shape[1:])
            return self.loss_fn(queries, all_pages, negatives, offset=offset)
        return self.in_batch_loss_fn(queries, all_pages, offset=offset)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise NonFiniteLossError (before any backward pass) when the loss is NaN or infinite."""
        if not torch.isfinite(loss):
            self._record_non_finite(loss)
            healthy = last_healthy_checkpoint(self.args.output_dir)
            last = str(healthy.path) if healthy else None
            raise NonFiniteLossError(
                f"The loss became {loss.item()} at step {self.state.global_step + 1} (learning rate "
                f"{self._current_lr():.3g}); training stopped before the weights were updated. Last healthy "
                f"checkpoint: {last or 'none yet'}{self._unhealthy_since(healthy)}. Lower --lr, raise "
                f"--warmup-steps, or check the data; continue with "
                f"{f'--resume {last}' if last else 'a fresh run (no --resume)'}."
            )

    def _record_non_finite(self, loss: torch.Tensor) -> None:
        """Leave the failure in trainer_state.json, so that scripts/training_report.py can name it."""
        if not self.model.training or not self.is_world_process_zero():
            return
        self.state.log_history.append(
            {"loss": float(loss.item()), "learning_rate": self._current_lr(), "step": self.state.global_step + 1,
             "epoch": self.state.epoch, "stopped": "non-finite loss"}
        )
        self.state.save_to_json(os.path.join(self.args.output_dir, "trainer_state.json"))

    def _unhealthy_since(self, healthy) -> str:
        """' (checkpoint-N: why, ...)' for the checkpoints saved after the last healthy one."""
        after = [c for c in list_checkpoints(self.args.output_dir)
                 if c.complete and c.healthy is False and (healthy is None or c.step > healthy.step)]
        if not after:
            return ""
        return " (" + "; ".join(f"{c.path.name} is not: {', '.join(c.health.get('problems', []))}" for c in after) + ")"

    # ---------------------------------------------------------------- checkpoints: completeness, health, resuming
    def train(self, *args, **kwargs):
        # before any checkpoint is loaded: the run's initial weights, the reference for their growth
        self._initial_max_abs = self._max_abs_trainable()
        return super().train(*args, **kwargs)

    def _max_abs_trainable(self) -> float:
        """The largest |value| of the trainable weights (NaN or inf when any is not finite)."""
        peaks = [p.detach().abs().amax().float().cpu() for p in self.model.parameters() if p.requires_grad and p.numel()]
        return float(torch.stack(peaks).max()) if peaks else 0.0

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # called once per optimizer step with that step's gradient norm (and again at an epoch's end: counted once)
        if grad_norm is not None and self.state.global_step != self._grad_norm_step:
            self._grad_norm_step = self.state.global_step
            if self._steps_since_save_from is None:
                self._steps_since_save_from = self.state.global_step
            if isinstance(grad_norm, torch.Tensor):  # stays on the device: no synchronisation per step
                self._bad_grad_norms = self._bad_grad_norms + (~torch.isfinite(grad_norm.detach())).sum()
            elif not math.isfinite(float(grad_norm)):
                self._bad_grad_norms = self._bad_grad_norms + 1
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _checkpoint_health(self) -> dict:
        """Whether the weights about to be saved are healthy: finite, no non-finite gradient norm since the previous
        checkpoint, and their largest value within WEIGHT_GROWTH_LIMIT times the run's initial one. (Every loss
        until now was finite: a non-finite one stops training before any step or save.)"""
        bad = int(self._bad_grad_norms)
        peak = self._max_abs_trainable()
        initial = self._initial_max_abs if self._initial_max_abs is not None else peak
        problems = []
        if bad:
            problems.append(f"{bad} non-finite gradient norm(s) since the previous checkpoint")
        if not math.isfinite(peak):
            problems.append("non-finite weights")
        elif initial > 0 and peak > WEIGHT_GROWTH_LIMIT * initial:
            problems.append(f"weights up to {peak:.3g}, {peak / initial:.0f}x the initial {initial:.3g}")
        first = self._steps_since_save_from if self._steps_since_save_from is not None else self.state.global_step
        return {"healthy": not problems, "problems": problems, "steps": [first, self.state.global_step],
                "non_finite_grad_norms": bad, "max_abs_weight": peak, "initial_max_abs_weight": initial,
                "growth_limit": WEIGHT_GROWTH_LIMIT}

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            remove_checkpoint_marker(folder)
        health = self._checkpoint_health()
        # transformers deletes old checkpoints right after writing the new one, before it is marked complete: a kill
        # then could leave none complete. Here they are deleted once the new one is complete (`_rotate_checkpoints`).
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (its RNG state) are written
        if self.args.should_save:
            write_checkpoint_marker(folder, self.state.global_step, health)
            if not health["healthy"]:
                logger.warning("%s is not healthy: %s.", folder.name, "; ".join(health["problems"]))
            self._rotate_checkpoints(run_dir)
        self._bad_grad_norms, self._steps_since_save_from = 0, None

    def _rotate_checkpoints(self, run_dir: Path) -> None:
        """Keep at most --save-total-limit complete checkpoints, never deleting the newest, the best (when the best
        model is kept) or the last healthy one; incomplete folders are left as they are."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        complete = [c for c in list_checkpoints(run_dir) if c.complete]
        healthy = last_healthy_checkpoint(run_dir)
        best = self.state.best_model_checkpoint
        keep = {complete[-1].path} if complete else set()
        keep |= {c.path for c in complete if (healthy and c.path == healthy.path) or (best and c.path == Path(best))}
        excess = len(complete) - max(limit, len(keep))
        for status in complete:
            if excess <= 0:
                break
            if status.path not in keep:
                logger.info("Deleting %s (--save-total-limit %d).", status.path, limit)
                shutil.rmtree(status.path, ignore_errors=True)
                excess -= 1

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from colintern.model.loading import check_adapter_checkpoint, load_checkpoint_weights

        target = self.model if model is None else model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if _is_peft(target):
            check_adapter_checkpoint(target, resume_from_checkpoint)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # transformers would load_state_dict(strict=False) without the key mapping: the language model stays at init
        load_checkpoint_weights(target, resume_from_checkpoint)
        return None

    def _load_best_model(self):
        from colintern.model.loading import check_adapter_checkpoint, load_checkpoint_weights

        best = self.state.best_model_checkpoint
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        if _is_peft(self.model):
            check_adapter_checkpoint(self.model, best)
            return super()._load_best_model()
        logger.info("Loading the best model from %s (score: %s).", best, self.state.best_metric)
        load_checkpoint_weights(self.model, best)
        return None

    def _current_lr(self) -> float:
        try:
            return float(self.lr_scheduler.get_last_lr()[0])
        except Exception:  # noqa: BLE001 - only for the message
            return float("nan")

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.cache_chunk_size:
            from colintern.training.grad_cache import cached_training_step

            loss = cached_training_step(self, model, inputs)
            if loss is not None:  # None: the batch fits in one chunk, a plain step is the same
                return loss
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            if self.cache_chunk_size:
                from colintern.training.grad_cache import chunked_loss

                return chunked_loss(self, model, inputs).detach(), None, None
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.retrieval_eval is not None:
            for name, value in self.retrieval_eval(self.model).items():
                output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# ------------------------------------------------------------------------------------------------ callbacks
class GracefulStop(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop. A second signal stops at once."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint after this step, then stopping.", self.requested)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class NoEvaluationInShortRuns(TrainerCallback):
    """transformers evaluates at the last step of every run with step-based evaluation. A run shorter than one
    --eval-steps interval (a --max-steps smoke run) skips that evaluation, which can take longer than the run."""

    def __init__(self):
        self.skip = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.skip = args.eval_strategy == "steps" and 0 < state.max_steps < state.eval_steps
        if self.skip:
            logger.info("No evaluation in this run: it ends at step %d, before the first evaluation at step %s "
                        "(--eval-steps; set it to %d to evaluate at the end).", state.max_steps, state.eval_steps,
                        state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.skip:  # runs after transformers' DefaultFlowCallback, which asked for the final evaluation
            control.should_evaluate = False
        return control


class WallClockLog(TrainerCallback):
    """Adds throughput (samples/s) to the logs."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.start = None
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.start is not None:
            elapsed = time.perf_counter() - self.start
            if elapsed > 0:
                logs["samples_per_second"] = round((state.global_step - self.start_step) * self.samples_per_step / elapsed, 2)


# ------------------------------------------------------------------------------------------------ model
def trainable_parameter_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def build_model(config: RunConfig, device: str | torch.device | None = None):
    """The model to train (a PeftModel with --peft) and its processor, parameters frozen as the config says."""
    from colintern.model.loading import load_model, load_processor

    dtype = _torch_dtype(config.model.dtype)
    attn = None if config.model.attn_implementation == "auto" else config.model.attn_implementation
    quantization = _quantization_config(config)
    kwargs = {"quantization_config": quantization} if quantization is not None else {}
    model = load_model(config.model.name_or_path, device=device, dtype=dtype, attn_implementation=attn,
                       attention=config.model.attention, **kwargs)
    processor = load_processor(config.model.name_or_path, max_num_visual_tokens=config.model.max_num_visual_tokens)

    model.requires_grad_(False)
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vision_parts = ["vision_tower", "multi_modal_projector"]
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.training.gradient_checkpointing)
        lora = LoraConfig(
            r=config.lora.rank,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            # the head is new: train it in full and save it inside the adapter
            modules_to_save=["custom_text_proj", *(vision_parts if config.training.train_vision else [])],
            init_lora_weights="gaussian",
        )
        model = get_peft_model(model, lora)
        # keep the name the user gave (e.g. an `embedded:` alias or a Hub id) in adapter_config.json
        model.peft_config["default"].base_model_name_or_path = config.model.name_or_path
    else:
        model.language_model.requires_grad_(True)
        model.custom_text_proj.requires_grad_(True)
        if config.training.train_vision:
            for part in vision_parts:
                getattr(model, part).requires_grad_(True)
    upcast_trainable_parameters(model)
    return model, processor


def upcast_trainable_parameters(model) -> int:
    """Keep float32 master weights for everything that trains, whatever dtype the model was loaded in.

    peft already upcasts LoRA weights, but `modules_to_save` copies (the head, the vision parts with --train-vision)
    and fully fine-tuned weights stay in the load dtype: in bf16, an AdamW update of ~lr is below half a bf16 ulp of
    most weights (8 mantissa bits), so one step on the tiny model changed 56% of the head's weights at lr 5e-5 and 1%
    at 5e-7 (100% in float32). The compute stays 16-bit under bf16 autocast (TrainingArguments.bf16); frozen weights
    keep the load dtype. Checkpoints save the float32 masters (exact resume; loading casts to the load dtype).
    Returns how many tensors were cast."""
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.to(torch.float32)
            cast += 1
    return cast


def _torch_dtype(name: str) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                "float32": torch.float32, "fp32": torch.float32}[name]
    except KeyError as error:
        raise ColinternError(f"Unknown dtype '{name}'; use auto, bfloat16, float16 or float32") from error


def _quantization_config(config: RunConfig):
    if not config.model.quantize:
        return None
    if config.model.quantize not in ("4bit", "8bit"):
        raise ColinternError(f"--quantize must be 4bit or 8bit, not '{config.model.quantize}'")
    if not torch.cuda.is_available():
        raise ColinternError(
            f"--quantize {config.model.quantize} (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no GPU. "
            "Train without --quantize here."
        )
    if not config.lora.enabled:
        raise ColinternError("--quantize needs --peft: quantized base weights cannot be trained directly.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ColinternError("--quantize needs bitsandbytes: pip install 'colintern[quant]'") from error
    from transformers import BitsAndBytesConfig

    if config.model.quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["custom_text_proj",
                                  "vision_tower", "multi_modal_projector"])
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["custom_text_proj", "vision_tower",
                                                                         "multi_modal_projector"])


def parameter_groups(model, config: RunConfig) -> list[dict]:
    """Optimizer groups: LoRA / language model at --lr, the head at --lr-head, vision parts at --lr-vision."""
    training = config.training
    groups: dict[str, dict] = {
        "lora_or_language_model": {"params": [], "lr": training.learning_rate},
        "head": {"params": [], "lr": training.lr_head or training.learning_rate},
        "vision": {"params": [], "lr": training.lr_vision or training.learning_rate},
    }
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "custom_text_proj" in name:
            groups["head"]["params"].append(parameter)
        elif "vision_tower" in name or "multi_modal_projector" in name:
            groups["vision"]["params"].append(parameter)
        else:
            groups["lora_or_language_model"]["params"].append(parameter)
    out = []
    for name, group in groups.items():
        if group["params"]:
            decay = training.weight_decay
            out.append({"name": name, "params": group["params"], "lr": group["lr"], "weight_decay": decay})
    return out


def build_optimizer(model, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups`, fused (one kernel over all parameters; transformers' own default) where every
    trainable parameter allows it. On the demo model's CPU step it takes 4.5 ms against 14 ms for torch's default,
    a loop over parameters on the CPU."""
    groups = parameter_groups(model, config)
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=config.training.learning_rate, weight_decay=config.training.weight_decay, fused=fused)


# ------------------------------------------------------------------------------------------------ run
@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    interrupted: bool
    metrics: dict


def _bf16(config: RunConfig) -> bool:
    value = config.training.bf16  # None: auto
    if value is None or str(value).lower() == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return str(value).lower() in ("1", "true", "yes")


def _report_to(config: RunConfig, output_dir: Path) -> list[str]:
    given = config.training.report_to  # TrainingArguments makes a list of it
    items = given if isinstance(given, list) else [given or "none"]
    targets = [t.strip() for item in items for t in str(item).split(",") if t.strip() and t.strip() != "none"]
    for target in targets:
        if target not in ("wandb", "tensorboard"):
            raise ColinternError(f"--report-to must be wandb, tensorboard or none, not '{target}'")
    if "wandb" in targets:
        os.environ.setdefault("WANDB_PROJECT", "colintern")
        os.environ.setdefault("WANDB_DIR", str(output_dir))
        if not os.environ.get("WANDB_API_KEY") and not _wandb_logged_in() and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
            logger.info("W&B: no API key found, logging offline to %s/wandb (upload later with `wandb sync`).",
                        output_dir)
    return targets


def _wandb_logged_in() -> bool:
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_resume(resume: str | None, output_dir: Path) -> str | None:
    """The checkpoint folder to resume from: `latest` is the newest complete checkpoint-N of `output_dir` (newer
    incomplete ones, left by a save that never finished, are skipped with a warning); an explicit folder must be
    complete."""
    if not resume:
        return None
    if resume == "latest":
        chosen, skipped = latest_complete_checkpoint(output_dir)
        for status in skipped:
            logger.warning("--resume latest: skipping %s, incomplete (%s).", status.path, status.problem)
        if chosen is None:
            if not skipped:
                raise ColinternError(f"--resume latest: no checkpoint-* folder in {output_dir} (start without --resume)")
            raise ColinternError(
                f"--resume latest: no complete checkpoint in {output_dir}: "
                + "; ".join(f"{s.path.name}: {s.problem}" for s in skipped) + ". Start without --resume."
            )
        _warn_if_unhealthy(chosen, output_dir)
        return str(chosen.path)
    folder = Path(resume)
    if not folder.is_dir() or not ((folder / "trainer_state.json").is_file() or checkpoint_step(folder) is not None):
        raise ColinternError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    status = inspect_checkpoint(folder)
    if not status.complete:
        latest, _ = latest_complete_checkpoint(Path(resume).parent)
        instead = f"--resume {latest.path}" if latest else "a fresh run (no --resume)"
        raise ColinternError(
            f"--resume {resume}: incomplete checkpoint ({status.problem}); its save did not finish. Use {instead}."
        )
    _warn_if_unhealthy(status, Path(resume).parent)
    return resume


def _warn_if_unhealthy(status, run_dir: Path) -> None:
    if status.healthy is not False:
        return
    healthy = last_healthy_checkpoint(run_dir, before_step=status.step)
    logger.warning("Resuming from %s, whose weights were not healthy when saved (%s); the last healthy one is %s.",
                   status.path, "; ".join(status.health.get("problems", [])), healthy.path if healthy else "none")


def check_launch() -> None:
    """Several GPUs in one process would make the Trainer use nn.DataParallel, which splits a batch's tiles apart."""
    if torch.cuda.device_count() > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        n = torch.cuda.device_count()
        raise ColinternError(
            f"{n} GPUs are visible but training was not launched with torchrun. Run "
            f"`torchrun --nproc_per_node={n} scripts/train.py ...` (or set CUDA_VISIBLE_DEVICES to one GPU)."
        )


@dataclass
class PreparedRun:
    """A Trainer ready to run, with what `train` needs around it."""

    trainer: ColInternTrainer
    stop: GracefulStop
    output_dir: Path
    resume: str | None


def recipe_arguments(config: RunConfig) -> dict:
    """The `TrainingArguments` that make the recipe (steps, batch, optimisation, precision, seed, logging), and any
    other TrainingArguments field the configuration sets (colintern.training.arguments.trainer_options)."""
    training = config.training
    from transformers.utils import is_torch_bf16_gpu_available

    from colintern.training.arguments import trainer_options

    bf16 = _bf16(config)
    return dict(
        **trainer_options(training),
        # --bf16 true without a bf16 accelerator: CPU autocast (transformers refuses bf16 there unless told use_cpu)
        use_cpu=bf16 and not is_torch_bf16_gpu_available(),
        output_dir=str(training.output_dir),
        num_train_epochs=training.num_train_epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.per_device_train_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        bf16=bf16,
        logging_steps=training.logging_steps,
        seed=training.seed,
    )


def set_aside_earlier_run(output_dir: Path, *, overwrite: bool, move: bool = True) -> Path | None:
    """A new run in a folder holding another run's checkpoints would replace them (same step numbers) or delete them
    (--save-total-limit): refuse, or with `overwrite` move them to `output_dir/previous-<time>/` (nothing is deleted).
    Returns that folder, if any."""
    from colintern.model.checkpoints import list_checkpoints

    earlier = [status.path for status in list_checkpoints(output_dir)]
    if not earlier:
        return None
    names = ", ".join(path.name for path in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
    if not overwrite:
        raise ColinternError(
            f"--output-dir {output_dir} already holds checkpoints of another run ({names}); a new run would replace "
            f"or delete them. Continue that run with --resume latest, choose a new --output-dir, or pass --overwrite "
            f"to start over (its checkpoints are then moved to {output_dir}/previous-<time>/, not deleted)."
        )
    target = output_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    if move:
        target.mkdir(exist_ok=True)
        for path in earlier:
            path.rename(target / path.name)
        logger.warning("--overwrite: moved the earlier run's %s to %s", names, target)
    return target


def build_trainer(
    config: RunConfig,
    callbacks: list[TrainerCallback] | None = None,
    *,
    scheduler_fn=None,
    save_checkpoints: bool = True,
    validate_resume: bool = True,
) -> PreparedRun:
    """Model, data, optimizer and Trainer for a run (no training yet).

    `scheduler_fn(optimizer) -> LRScheduler` replaces the configured warm-up/decay schedule (the LR finder's
    exponential sweep); `save_checkpoints=False` writes no checkpoints and no run files besides the configuration.
    """
    from colintern.data.pairs import build_datasets

    check_launch()
    output_dir = Path(config.training.output_dir)
    resume = resolve_resume(config.training.resume_from_checkpoint, output_dir) if validate_resume else None
    output_dir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if save_checkpoints and resume is None:
        set_aside_earlier_run(output_dir, overwrite=config.training.overwrite, move=is_main)
    if is_main:
        record = config.to_dict()
        record["runtime"] = runtime_info()
        from colintern.utils import atomic_write_json

        atomic_write_json(output_dir / RUN_CONFIG_FILE, record)
    if config.training.loss in NEGATIVE_LOSSES and not config.data.negatives_column:
        raise ColinternError(f"--loss {config.training.loss} needs hard negatives: set --negatives-column")
    from colintern.training.grad_cache import check_cache_chunk_size

    check_cache_chunk_size(config.training.cache_chunk_size, config.training.per_device_train_batch_size)

    torch.manual_seed(config.training.seed)
    model, processor = build_model(config)
    data = build_datasets(config, processor, report_dir=output_dir if is_main else None,
                          use_negatives=config.training.loss in NEGATIVE_LOSSES)
    if config.training.loss in NEGATIVE_LOSSES and not data.has_negatives:
        raise ColinternError(
            f"--loss {config.training.loss} needs hard negatives, but the training set has no "
            f"'{config.data.negatives_column}' column. Add them with scripts/mine_hard_negatives.py."
        )
    _log_trainable(model)

    training = config.training
    eval_enabled = (data.eval_dataset is not None or data.retrieval_split is not None) and bool(training.eval_steps)
    args = TrainingArguments(
        **recipe_arguments(config),
        per_device_eval_batch_size=training.per_device_train_batch_size,
        eval_strategy="steps" if eval_enabled else "no",
        eval_steps=training.eval_steps,
        save_strategy="steps" if save_checkpoints else "no",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        load_best_model_at_end=bool(training.early_stopping_patience) and eval_enabled and save_checkpoints,
        metric_for_best_model=data.best_metric if eval_enabled else None,
        greater_is_better=data.best_metric_greater_is_better if eval_enabled else None,
        data_seed=training.seed,
        report_to=_report_to(config, output_dir),
        run_name=training.run_name or output_dir.name,
        remove_unused_columns=False,
        dataloader_num_workers=training.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned host memory only speeds up copies to a GPU
        dataloader_persistent_workers=training.dataloader_num_workers > 0,
        train_sampling_strategy="group_by_length" if data.varied_lengths else "random",
        length_column_name=data.length_column,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    optimizer = build_optimizer(model, config)
    stop = GracefulStop()
    all_callbacks: list[TrainerCallback] = [
        stop, WallClockLog(training.per_device_train_batch_size * training.gradient_accumulation_steps * max(1, args.world_size)),
        NoEvaluationInShortRuns(),
    ]
    if training.early_stopping_patience and eval_enabled:
        from transformers import EarlyStoppingCallback

        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    trainer = ColInternTrainer(
        model=model,
        args=args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset if eval_enabled else None,
        data_collator=data.collator,
        processing_class=processor,
        optimizers=(optimizer, scheduler_fn(optimizer) if scheduler_fn else None),
        callbacks=[*all_callbacks, *(callbacks or [])],
        loss_fn=build_loss(training.loss, training.temperature),
        in_batch_loss_fn=build_loss(IN_BATCH_EQUIVALENT.get(training.loss, training.loss), training.temperature),
        retrieval_eval=RetrievalEvaluator(data.retrieval_split, processor) if eval_enabled and data.retrieval_split else None,
        cache_chunk_size=training.cache_chunk_size,
    )
    return PreparedRun(trainer, stop, output_dir, resume)


def train(config: RunConfig, callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """Run (or resume) a training run as configured; see scripts/train.py for the command line."""
    run = build_trainer(config, callbacks)
    trainer, stop, output_dir = run.trainer, run.stop, run.output_dir
    if run.resume:
        logger.info("Resuming from %s", run.resume)
    elif list_checkpoints(output_dir):
        logger.warning("%s already has checkpoints; this run starts over. Pass --resume latest to continue.", output_dir)

    stop.install()
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=run.resume)
    finally:
        stop.uninstall()
    metrics = dict(result.metrics)
    metrics["train_wall_seconds"] = round(time.perf_counter() - started, 1)
    metrics["peak_memory_gb"] = peak_memory_gb()
    metrics["trainable_parameters"], metrics["total_parameters"] = _parameter_counts(trainer.model)

    interrupted = stop.requested is not None
    if interrupted:
        latest, _ = latest_complete_checkpoint(output_dir)
        logger.warning("Stopped by %s at step %d. Checkpoint: %s. Continue with --resume latest.",
                       stop.requested, trainer.state.global_step, latest.path if latest else "none")
    else:
        trainer.save_model(str(output_dir))  # adapter (or full model) + processor at the top of the run directory
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    return TrainResult(output_dir, trainer.state.global_step, interrupted, metrics)


def runtime_info() -> dict:
    """Where the run ran: recorded next to the configuration (not part of it)."""
    import platform

    import transformers

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "world_size": world,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by tensors on CUDA; on the CPU, the process's peak resident set size."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # kB -> GB on Linux


def _parameter_counts(model) -> tuple[int, int]:
    """(trainable, total): peft's count for a PeftModel (4-bit weights counted as parameters, not bytes),
    transformers' otherwise."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return tuple(model.get_nb_trainable_parameters())
    return model.num_parameters(only_trainable=True), model.num_parameters()


def _log_trainable(model) -> None:
    trainable, total = _parameter_counts(model)
    logger.info("Trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(1, total))


__all__ = [
    "ColInternTrainer",
    "PreparedRun",
    "build_trainer",
    "GracefulStop",
    "NonFiniteLossError",
    "TrainResult",
    "build_loss",
    "build_model",
    "compact_multivectors",
    "gather_pages",
    "parameter_groups",
    "train",
    "trainable_parameter_names",
    "upcast_trainable_parameters",
]
