"""Gradient cache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

`--cache-chunk-size N` with `--batch-size B`: the contrastive loss sees all B queries against all B pages (x world
size, plus hard negatives) while activations are only ever held for N rows at a time:

  1. every chunk of N rows is embedded without a graph (queries, pages, hard negatives), the random state before each
     forward pass recorded;
  2. the loss is computed on the full score matrix from those embeddings (ColInternTrainer.embedding_loss: the same
     code as a plain step, cross-rank gather included) and its gradient w.r.t. every embedding is kept;
  3. each chunk is embedded again, with a graph and from the recorded random state (same dropout masks; gradient
     checkpointing replays its own), and the kept gradient is back-propagated through it.

Parameter gradients are those of one step with a graph over the same forward passes. The optimizer, scheduler,
clipping, accumulation and DDP synchronisation stay transformers'/accelerate's: this only replaces the forward and
backward of `Trainer.training_step`; DDP all-reduces once, after the last chunk. Page augmentation runs in the
collator, before the step, so both passes see the same pixels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from colintern.utils import ColinternError

PARTS = ("query_", "doc_", "neg_doc_")  # the collator's input prefixes, in the order a plain step embeds them


def check_cache_chunk_size(chunk: int | None, batch_size: int) -> None:
    if chunk is None:
        return
    if chunk < 1:
        raise ColinternError(f"--cache-chunk-size must be at least 1, not {chunk} (leave it out for a plain step)")
    if chunk > batch_size:
        raise ColinternError(
            f"--cache-chunk-size {chunk} is larger than --batch-size {batch_size}: the gradient cache splits the "
            "batch into chunks; use a chunk of at most the batch size (or leave it out)."
        )


@dataclass
class RandomState:
    """torch's CPU generator and the CUDA generators of `devices`, to replay one forward pass's dropout."""

    devices: list[int]
    cpu: torch.Tensor = field(init=False)
    cuda: list[torch.Tensor] = field(init=False)

    def __post_init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(device) for device in self.devices]

    @contextlib.contextmanager
    def replay(self):
        """Run the block from the recorded state; the generators are given back as they were before the block."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def _cuda_devices(inputs: dict) -> list[int]:
    return sorted({v.device.index or 0 for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_cuda})


def _rows(part_inputs: dict) -> int:
    return int(part_inputs["input_ids"].shape[0])


def _split_part(part_inputs: dict, bounds: list[tuple[int, int]], image_token_id: int) -> list[dict]:
    """Row ranges of one part's inputs; `pixel_values` (all tiles of the batch) split by each row's tiles."""
    rows = _rows(part_inputs)
    tile_offsets = None
    if part_inputs.get("pixel_values") is not None:
        image_tokens = (part_inputs["input_ids"] == image_token_id).sum(dim=1)
        tiles = part_inputs["pixel_values"].shape[0]
        per_tile = int(image_tokens.sum()) // max(1, tiles)
        if per_tile == 0 or int(image_tokens.sum()) != per_tile * tiles:
            raise ValueError(f"{int(image_tokens.sum())} image tokens do not divide into {tiles} tiles")
        tile_offsets = [0, *torch.cumsum(image_tokens // per_tile, 0).tolist()]
    chunks = []
    for start, stop in bounds:
        chunk = {}
        for key, value in part_inputs.items():
            if key == "pixel_values" and tile_offsets is not None:
                chunk[key] = value[tile_offsets[start] : tile_offsets[stop]]
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
                chunk[key] = value[start:stop]
            else:
                chunk[key] = value
        chunks.append(chunk)
    return chunks


def split_batch(inputs: dict, chunk_size: int, image_token_id: int) -> tuple[list[dict[str, dict]], int]:
    """The collator's batch as chunks of `chunk_size` queries, each {prefix: that prefix's model inputs} holding the
    chunk's queries, their pages and their hard negatives; and the number of hard negatives per query."""
    parts = {prefix: {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)} for prefix in PARTS}
    n_negatives = int(parts["neg_doc_"].pop("count", 0)) if parts["neg_doc_"] else 0
    if not n_negatives:
        parts.pop("neg_doc_")
    batch = _rows(parts["query_"])
    bounds = [(start, min(start + chunk_size, batch)) for start in range(0, batch, chunk_size)]
    split = {}
    for prefix, part_inputs in parts.items():
        per_row = n_negatives if prefix == "neg_doc_" else 1
        split[prefix] = _split_part(part_inputs, [(a * per_row, b * per_row) for a, b in bounds], image_token_id)
    return [{prefix: split[prefix][i] for prefix in split} for i in range(len(bounds))], n_negatives


def _image_token_id(trainer) -> int:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return int(model.config.image_token_id)


def _embed_without_graph(trainer, model, chunks: list[dict]) -> tuple[dict[str, list[torch.Tensor]], list[dict]]:
    """Pass 1: every chunk's embeddings (no graph) and the random state before each forward pass."""
    embeddings: dict[str, list[torch.Tensor]] = {prefix: [] for prefix in chunks[0]}
    states = []
    with torch.no_grad():
        for chunk in chunks:
            chunk_states = {}
            for prefix, part_inputs in chunk.items():
                chunk_states[prefix] = RandomState(_cuda_devices(part_inputs))
                with trainer.compute_loss_context_manager():
                    embeddings[prefix].append(model(**part_inputs))
            states.append(chunk_states)
    return embeddings, states


def _loss(trainer, embeddings: dict[str, list[torch.Tensor]], n_negatives: int) -> torch.Tensor:
    cat = {prefix: torch.cat(tensors) for prefix, tensors in embeddings.items()}
    with trainer.compute_loss_context_manager():
        return trainer.embedding_loss(cat["query_"], cat["doc_"], cat.get("neg_doc_"), n_negatives)


def chunked_loss(trainer, model, inputs: dict) -> torch.Tensor:
    """The loss of a batch embedded chunk by chunk without a graph (evaluation of a cached run: same value as the
    plain loss, activations of one chunk at a time)."""
    inputs = trainer._prepare_inputs(inputs)
    chunks, n_negatives = split_batch(inputs, trainer.cache_chunk_size, _image_token_id(trainer))
    embeddings, _ = _embed_without_graph(trainer, model, chunks)
    with torch.no_grad():
        return _loss(trainer, embeddings, n_negatives)


def cached_training_step(trainer, model, inputs: dict) -> torch.Tensor | None:
    """One `Trainer.training_step` through the gradient cache; None when the batch fits in one chunk."""
    chunk_size = trainer.cache_chunk_size
    if int(inputs["query_input_ids"].shape[0]) <= chunk_size:
        return None
    model.train()
    if hasattr(trainer.optimizer, "train") and callable(trainer.optimizer.train):
        trainer.optimizer.train()
    inputs = trainer._prepare_inputs(inputs)
    chunks, n_negatives = split_batch(inputs, chunk_size, _image_token_id(trainer))

    embeddings, states = _embed_without_graph(trainer, model, chunks)
    leaves = {prefix: [e.detach().requires_grad_(True) for e in tensors] for prefix, tensors in embeddings.items()}
    del embeddings
    loss = _loss(trainer, leaves, n_negatives)
    trainer.check_finite(loss)  # before any backward pass: the weights stay untouched
    # the Trainer's own scaling for accumulation (colintern's loss is a batch mean; see ColInternTrainer.__init__)
    loss = loss / trainer.current_gradient_accumulation_steps
    flat = [leaf for tensors in leaves.values() for leaf in tensors]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(flat, grads)]
    cached, i = {}, 0
    for prefix, tensors in leaves.items():
        cached[prefix] = grads[i : i + len(tensors)]
        i += len(tensors)
    del leaves, flat, grads

    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        # DDP all-reduces on the last chunk's backward only (the Trainer's own no_sync still wraps accumulation)
        sync = contextlib.nullcontext() if last else trainer.accelerator.no_sync(model)
        with sync:
            surrogate = None
            for prefix, part_inputs in chunk.items():
                with states[index][prefix].replay(), trainer.compute_loss_context_manager():
                    output = model(**part_inputs)
                # d(surrogate)/d(output) is exactly the cached gradient
                term = torch.sum(output * cached[prefix][index].to(output.dtype))
                surrogate = term if surrogate is None else surrogate + term
            trainer.accelerator.backward(surrogate)
    return loss.detach()


__all__ = ["RandomState", "cached_training_step", "check_cache_chunk_size", "chunked_loss", "split_batch"]
