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


def resolve_device(device: str) -> torch.device:
    """A stage's `device` setting as a torch device: "auto" is cuda when present, and "cuda"
    under torchrun is this rank's GPU (LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(device)


def setup(device: torch.device | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else single process:
    NCCL when the stage runs on a GPU, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if on_gpu and device is not None:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if on_gpu else "gloo")
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
