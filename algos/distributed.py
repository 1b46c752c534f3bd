"""Data-parallel training across processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): joining the process
group and the few collectives the loops use. With one process every function here is the identity or a no-op."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun); known before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one (and it is not joined yet): NCCL on GPU, gloo on CPU.
    Returns rank, world size, device."""
    world_size = launched_world_size()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per rank
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, dev


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_grads(params: list[torch.Tensor], bucket_numel: int = 1 << 25) -> None:
    """Average the gradients of `params` over ranks in a few flat buckets. A param without a gradient on one rank
    counts as zero there; one without a gradient on every rank keeps none, so that AdamW skips it as it does in a
    single process (a zero gradient would still advance its step count and decay its moments)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not params:
        return
    world_size = dist.get_world_size()
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad)
    params = [p for p, anywhere in zip(params, has_grad.tolist()) if anywhere]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        start = 0
        while start < len(grads):
            end, numel = start, 0
            while end < len(grads) and (numel == 0 or numel + grads[end].numel() <= bucket_numel):
                numel += grads[end].numel()
                end += 1
            flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
            dist.all_reduce(flat)
            flat /= world_size
            for g, chunk in zip(grads[start:end], flat.split([g.numel() for g in grads[start:end]])):
                g.copy_(chunk.view_as(g))
            start = end
