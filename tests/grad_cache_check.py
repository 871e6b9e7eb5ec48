"""Gradient-cache equality on the tiny model: the reference step and a check run by torchrun on 2 gloo ranks.

Not collected by pytest (no test_ prefix); tests/training/test_grad_cache.py imports its helpers and launches it.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch

from colintern.training.arguments import RunConfig


def tiny_config(output_dir, dataset, *, dropout=0.1, lora=True, gradient_checkpointing=False, batch_size=8,
                chunk=3) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"name_or_path": "embedded:tiny-internvl3_5", "max_num_visual_tokens": 16, "dtype": "float32"},
            "data": {"dataset": str(dataset), "eval_split": None},
            "lora": {"enabled": lora, "rank": 4, "alpha": 8, "dropout": dropout},
            "training": {
                "output_dir": str(output_dir), "max_steps": 2, "batch_size": batch_size, "grad_accum": 1,
                "lr": 2e-3, "warmup_steps": 0, "save_steps": 100, "eval_steps": None, "logging_steps": 1,
                "report_to": "none", "gradient_checkpointing": gradient_checkpointing, "dataloader_num_workers": 0,
                "seed": 3, "cache_chunk_size": chunk, "bf16": "false",
            },
        }
    )


def batch(trainer, rows: range, negatives: bool):
    """The collator's batch of `rows`; with `negatives`, each row's hard negative is the next row's page."""
    collator = trainer.data_collator
    dataset = trainer.train_dataset
    examples = [dict(dataset[i]) for i in rows]
    if negatives:
        collator.negatives_column, collator.num_negatives = "negatives", 1
        for i, example in zip(rows, examples):
            example["negatives"] = [dataset[(i + 1) % len(dataset)][collator.image_column]]
    return collator(examples)


def gradients(trainer, step) -> dict[str, torch.Tensor]:
    """Parameter gradients after `step()` from zero gradients, seeded the same way every time."""
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    step()
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def chunked_graph_step(trainer, model, inputs, chunk: int) -> torch.Tensor:
    """The reference: one ordinary backward pass through a graph over the same forward passes as the cache makes
    (chunk by chunk: its queries, pages, hard negatives), so the same dropout masks are drawn."""
    from colintern.training.grad_cache import _image_token_id, split_batch

    model.train()
    inputs = trainer._prepare_inputs(inputs)
    chunks, n_negatives = split_batch(inputs, chunk, _image_token_id(trainer))
    outputs = {prefix: [] for prefix in chunks[0]}
    for piece in chunks:
        for prefix, part_inputs in piece.items():
            outputs[prefix].append(model(**part_inputs))
    cat = {prefix: torch.cat(tensors) for prefix, tensors in outputs.items()}
    loss = trainer.embedding_loss(cat["query_"], cat["doc_"], cat.get("neg_doc_"), n_negatives)
    trainer.accelerator.backward(loss)
    return loss.detach()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main(dataset: str, out_path: str) -> None:
    """Under torchrun: each rank its own rows; cached gradients (after DDP's all-reduce) against the plain step
    (dropout off) and against the chunked-graph reference (dropout on), with and without hard negatives."""
    import os

    from colintern.training.trainer import build_loss, build_trainer

    rank = int(os.environ["RANK"])
    results = {}
    for dropout in (0.0, 0.1):
        run = build_trainer(tiny_config(Path(out_path).parent / f"ddp-{dropout}", dataset, dropout=dropout),
                            save_checkpoints=False)
        trainer = run.trainer
        trainer.create_optimizer_and_scheduler(num_training_steps=2)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop
        model = trainer.accelerator.prepare(trainer.model)  # DDP on gloo, as the Trainer wraps it
        trainer.model_wrapped = model
        for negatives in (False, True):
            trainer.loss_fn = build_loss("negative-ce" if negatives else "colbert")
            inputs = batch(trainer, range(rank * 8, rank * 8 + 8), negatives)
            trainer.cache_chunk_size = 3
            cached = gradients(trainer, partial(trainer.training_step, model, dict(inputs)))
            if dropout == 0.0:
                trainer.cache_chunk_size = None
                reference = gradients(trainer, partial(trainer.training_step, model, dict(inputs)))
            else:
                reference = gradients(trainer, partial(chunked_graph_step, trainer, model, dict(inputs), 3))
            results[f"dropout={dropout},negatives={negatives}"] = max_difference(cached, reference)
    torch.distributed.barrier()
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
