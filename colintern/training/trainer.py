"""Contrastive training of ColIntern3.5 on transformers' Trainer, with colpali-engine's late-interaction losses.

What this adds to a plain Trainer:
  * PEFT done right: LoRA on the language model's attention/MLP linears only, and `custom_text_proj` trained in full
    through peft's `modules_to_save`, so the head is saved inside the adapter (a checkpoint evaluated in a fresh
    process gives exactly the trained model's embeddings; upstream, a LoRA-on-a-random-head adapter evaluates as
    garbage).
  * In-batch negatives gathered from every DDP rank (differentiably), hard negatives when the data has them.
  * Page embeddings compacted to their image tokens before the loss, padded by repeating a real token (which never
    changes a max), so padding can never win MaxSim even when every real similarity is negative.
  * Guards: data validated before the first step; a non-finite loss stops before the weights are touched, keeping
    the last good checkpoint; SIGINT/SIGTERM save a checkpoint and stop cleanly; `--resume latest` continues.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from colintern.training.arguments import RunConfig
from colintern.utils import RUN_CONFIG_FILE, ColinternError

logger = logging.getLogger(__name__)

NEGATIVE_LOSSES = {"negative-ce", "pairwise-negative-ce"}
# the loss a hard-negative loss falls back to on batches without negatives (the evaluation split has none)
IN_BATCH_EQUIVALENT = {"negative-ce": "colbert", "pairwise-negative-ce": "pairwise"}


class NonFiniteLossError(ColinternError):
    """The loss became NaN or infinite; raised before the backward pass so no weight is corrupted."""


# ------------------------------------------------------------------------------------------------ losses
def build_loss(name: str, temperature: float | None = None) -> torch.nn.Module:
    """colpali-engine's late-interaction losses by name (`--loss`)."""
    from colpali_engine.loss import (
        ColbertLoss,
        ColbertNegativeCELoss,
        ColbertPairwiseCELoss,
        ColbertPairwiseNegativeCELoss,
    )

    losses = {
        "colbert": ColbertLoss,
        "pairwise": ColbertPairwiseCELoss,
        "negative-ce": ColbertNegativeCELoss,
        "pairwise-negative-ce": ColbertPairwiseNegativeCELoss,
    }
    if name not in losses:
        raise ColinternError(f"Unknown loss '{name}'; choose one of {', '.join(losses)}")
    # norm_tol: colpali-engine prints a warning when length-normalised scores leave [0, 1]; with exact MaxSim
    # (see compact_multivectors) a query token's best match can be negative, so the valid range is [-1, 1].
    kwargs = {"norm_tol": 1.0} if temperature is None else {"temperature": temperature, "norm_tol": 1.0}
    return losses[name](**kwargs)


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
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise NonFiniteLossError(
                f"The loss became {loss.item()} at step {self.state.global_step + 1} (learning rate "
                f"{self._current_lr():.3g}); training stopped before the weights were updated. Last good checkpoint: "
                f"{last or 'none yet'}. Lower --lr, raise --warmup-steps, or check the data; continue with "
                f"--resume {last or 'latest'}."
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
    model = load_model(config.model.name_or_path, device=device, dtype=dtype, attn_implementation=attn, **kwargs)
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
    return model, processor


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
        "lora_or_language_model": {"params": [], "lr": training.lr},
        "head": {"params": [], "lr": training.lr_head or training.lr},
        "vision": {"params": [], "lr": training.lr_vision or training.lr},
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
    return torch.optim.AdamW(groups, lr=config.training.lr, weight_decay=config.training.weight_decay, fused=fused)


# ------------------------------------------------------------------------------------------------ run
@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    interrupted: bool
    metrics: dict


def _bf16(config: RunConfig) -> bool:
    value = str(config.training.bf16).lower()
    if value == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return value in ("1", "true", "yes")


def _report_to(config: RunConfig, output_dir: Path) -> list[str]:
    targets = [t.strip() for t in config.training.report_to.split(",") if t.strip() and t.strip() != "none"]
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
    if not resume:
        return None
    if resume == "latest":
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise ColinternError(f"--resume latest: no checkpoint-* folder in {output_dir} (start without --resume)")
        return last
    if not Path(resume).is_dir() or not (Path(resume) / "trainer_state.json").is_file():
        raise ColinternError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return resume


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
    """The `TrainingArguments` that make the recipe (steps, batch, optimisation, precision, seed, logging)."""
    training = config.training
    return dict(
        output_dir=str(training.output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum,
        learning_rate=training.lr,
        lr_scheduler_type=training.scheduler,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        bf16=_bf16(config),
        logging_steps=training.logging_steps,
        seed=training.seed,
    )


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
    resume = resolve_resume(config.training.resume, output_dir) if validate_resume else None
    output_dir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        record = config.to_dict()
        record["runtime"] = runtime_info()
        from colintern.utils import atomic_write_json

        atomic_write_json(output_dir / RUN_CONFIG_FILE, record)
    if config.training.loss in NEGATIVE_LOSSES and not config.data.negatives_column:
        raise ColinternError(f"--loss {config.training.loss} needs hard negatives: set --negatives-column")
    from colintern.training.grad_cache import check_cache_chunk_size

    check_cache_chunk_size(config.training.cache_chunk_size, config.training.batch_size)

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
        per_device_eval_batch_size=training.batch_size,
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
        stop, WallClockLog(training.batch_size * training.grad_accum * max(1, args.world_size))
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
    elif get_last_checkpoint(str(output_dir)):
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

    interrupted = stop.requested is not None
    if interrupted:
        logger.warning("Stopped by %s at step %d. Checkpoint: %s. Continue with --resume latest.",
                       stop.requested, trainer.state.global_step, get_last_checkpoint(str(output_dir)))
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


def _log_trainable(model) -> None:
    """peft's count for a PeftModel (4-bit weights counted as parameters, not bytes), transformers' otherwise."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
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
]
