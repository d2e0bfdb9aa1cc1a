"""Processes, devices and model wrapping for data-parallel training on PyTorch's own stack.

``torchrun`` (and ``torchrun`` inside SLURM) sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; ``srun`` alone sets ``SLURM_PROCID``, ``SLURM_LOCALID`` and
``SLURM_NTASKS``, and the job script exports ``MASTER_ADDR``/``MASTER_PORT``. Either works;
one plain process is world size 1 and needs no process group at all.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import Strategy, check_choice
from ..data import dist_info
from ..device import check_device, resolve_device  # noqa: F401 (resolve_device: also imported from here)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank_info(env: dict | None = None) -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's variables, else SLURM's, else (0, 0, 1):
    what the launcher asks this process to become, read before a process group exists. Once
    one exists, :func:`m3ae.data.dist_info` reads the ranks from it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def init_distributed(device_name: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group (NCCL on GPUs, gloo on CPU) and pick this process's device."""
    check_device(device_name)
    rank, local_rank, world = env_rank_info()
    if dist.is_initialized():  # a group the caller made (by any init method): its ranks hold
        rank, world = dist_info()
    cuda = torch.cuda.is_available() if device_name == "auto" else device_name.startswith("cuda")
    if cuda:
        if device_name in ("auto", "cuda"):
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        else:
            device = torch.device(device_name)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if device_name == "auto" else device_name)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                f"rank {rank} of {world}: MASTER_ADDR is not set. Under SLURM export it in the job "
                "script, e.g. MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1), "
                "or launch with torchrun, which sets it")
        os.environ.setdefault("MASTER_PORT", "29500")
        # srun sets only SLURM_*; init_process_group's env:// reads RANK/WORLD_SIZE.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (for small things: paths, flags)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank (small things: counters, positions)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def control_group(info: DistInfo):
    """A gloo group beside an NCCL one, for the per-step stop flag: a CPU all-reduce of one
    number does not wait for the GPU's queue as an NCCL one read on the host would. None
    (the default group) when the default group is gloo already, or in one process."""
    if not info.distributed or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def first_failure(failed: str | None, info: DistInfo, group=None) -> tuple[int, str] | None:
    """Collective: ``(rank, message)`` of the lowest rank whose ``failed`` is not None, on every
    rank, or None when no rank failed. A rank that stops alone leaves the others waiting in the
    next collective until the process-group timeout; asking this at the step boundary lets
    all of them stop together."""
    if not info.distributed:
        return None if failed is None else (0, failed)
    flag = torch.tensor([info.rank if failed is not None else info.world_size], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    src = int(flag)
    if src == info.world_size:
        return None
    box = [failed]
    dist.broadcast_object_list(box, src=src, group=group)
    return src, box[0]


def wrap_model(module: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP (default) or FSDP2 around ``module``; unchanged in a single process.

    DDP runs without ``find_unused_parameters``: the training step ties every parameter into
    the graph (see :class:`m3ae.training.step.LossModule`), so an image-only or text-only batch is fine.
    FSDP2 shards each encoder/decoder block, then the rest of the model.
    """
    check_choice("train.strategy", strategy, Strategy)
    if not info.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        ids = [info.device.index] if info.device.type == "cuda" else None
        # The only buffers are fixed sin-cos tables, identical everywhere: no per-step broadcast.
        # (Newer torch renamed the switch and warns about the old name.)
        params = inspect.signature(DDP.__init__).parameters
        no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                           else {"broadcast_buffers": False})
        return DDP(module, device_ids=ids, **no_sync_buffers)
    from torch.distributed.fsdp import fully_shard

    model = module.model
    for blk in list(model.encoder.blocks) + list(model.decoder.blocks):
        fully_shard(blk)
    fully_shard(module)
    return module


__all__ = ["DistInfo", "env_rank_info", "init_distributed", "shutdown_distributed", "all_reduce_sum",
           "barrier", "broadcast_object", "gather_objects", "control_group", "first_failure", "wrap_model"]
