"""torch.distributed for one run over several processes (torchrun): DDP, sharded global batches,
rank-0-only logging. With one process every helper here is the identity, so the single-process
path stays exactly what it was.

Equivalence with one process at the same global batch: every rank draws the *global* batch from
the same generator (same order, flips and noise) and keeps its slice, gradients are averaged by DDP,
and evaluations sum per-image bits/dim over ranks. Batch norm is the exception: on CUDA the s/t
networks' BatchNorm layers become SyncBatchNorm; on the CPU (gloo) PyTorch has no SyncBatchNorm, so
batch statistics there are per rank, and so are the batch-norm bijector's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()  # one process


def from_env() -> Dist:
    """What torchrun says (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is rank 0 of 1."""
    return Dist(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def init(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (nccl on GPU, gloo on CPU); returns this rank's device."""
    if not d.enabled:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shard(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's share of a global batch (every rank holds the same global batch)."""
    return x[d.rank :: d.world] if d.enabled else x


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(obj, d: Dist):
    """Rank 0's Python object on every rank."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """DDP around the model (SyncBatchNorm on CUDA), or the model itself with one process."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def shutdown(d: Dist, clean: bool = True) -> None:
    """Leave the process group. ``clean`` (every rank finished normally): first free what still
    holds the group (DDP's reducer) and wait for every rank, so no rank tears gloo down while a peer
    still talks to it; a rank exiting alone while rank 0 was still logging aborted in gloo during
    interpreter shutdown ("terminate called without an active exception", ~1 run in 5 under load).
    After a failure there is no barrier: a peer may never arrive."""
    if not d.enabled:
        return
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        if clean:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()
