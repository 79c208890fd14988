"""Data-parallel fine-tuning with torchrun: process group set-up and the few collectives we need.

    torchrun --nproc_per_node 2 -m training.cli train --config configs/tiny-ivon.yaml

Each rank takes its share of every batch. IVON all-reduces its averaged gradient and
(theta - m) * g statistics inside `step()` (`sync=True`), so every rank keeps the same mean and
Hessian; its noise is seeded per rank. AdamW gets a plain gradient all-reduce. Rank 0 alone
writes checkpoints, logs and the exported posterior. On CPU the backend is gloo, on GPUs nccl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: list[int]) -> list[int]:
        """This rank's part of a batch (interleaved, so shares differ by at most one item)."""
        return idx[self.rank :: self.world]


def setup() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size())


def all_reduce_grads(params: list[torch.Tensor], info: DistInfo) -> None:
    """Mean of the gradients over ranks (for optimizers without their own sync)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
