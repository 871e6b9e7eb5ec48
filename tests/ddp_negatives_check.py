"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): each rank's loss must use the pages of every rank.

Not collected by pytest (no test_ prefix); tests/test_distributed.py launches it.
"""

import json
import sys

import torch
import torch.distributed as dist
from colpali_engine.loss import ColbertLoss

from colintern.training.trainer import gather_pages

BATCH, DIM = 3, 16


def embeddings(seed: int, tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(BATCH, tokens, DIM, generator=generator), dim=-1)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    queries = embeddings(100 + rank, 5)
    pages = embeddings(200 + rank, 7 + rank).requires_grad_(True)  # ranks have different page lengths
    all_pages, offset = gather_pages(pages)
    loss_fn = ColbertLoss()
    loss = loss_fn(queries, all_pages, offset=offset)
    loss.backward()

    # the same loss computed from every rank's pages, without any communication
    from colintern.training.trainer import compact_multivectors

    longest = max(7 + r for r in range(world))
    reference_pages = torch.cat([compact_multivectors(embeddings(200 + r, 7 + r), longest) for r in range(world)])
    reference = loss_fn(queries, reference_pages, offset=rank * BATCH)
    local_only = loss_fn(queries, pages.detach())

    # gradient check: d(sum of every rank's loss)/d(this rank's pages), computed without communication
    every_pages = [embeddings(200 + r, 7 + r).requires_grad_(True) for r in range(world)]
    stacked = torch.cat([compact_multivectors(p, longest) for p in every_pages])
    total = sum(loss_fn(embeddings(100 + r, 5), stacked, offset=r * BATCH) for r in range(world))
    total.backward()
    expected_grad = every_pages[rank].grad
    result = {
        "rank": rank,
        "gathered_pages": all_pages.shape[0],
        "offset": offset,
        "loss": loss.item(),
        "reference": reference.item(),
        "local_only": local_only.item(),
        "grad_ok": bool(pages.grad is not None and pages.grad.abs().sum() > 0
                        and torch.allclose(pages.grad, expected_grad, atol=1e-6)),
    }
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
