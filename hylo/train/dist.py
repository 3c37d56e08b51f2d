"""Distributed setup for torchrun: DDP (default) or FSDP2 (``fsdp: true``).

The same command runs on one process or under ``torchrun --nproc_per_node N``: when ``WORLD_SIZE > 1`` is in
the environment (torchrun sets it, with RANK, LOCAL_RANK, MASTER_ADDR/PORT) the process group is created with
``nccl`` on CUDA and ``gloo`` on CPU. A process group that already exists (a caller that set one up) is reused
and left alone at the end. Each rank reads its own slice of every batch (see :class:`hylo.data.TokenLoader`), so
the global batch is ``batch_size x world_size x grad_accum`` sequences. Rank 0 logs and writes files.

FSDP2 uses ``torch.distributed.fsdp.fully_shard`` on every block, then the root; checkpoints gather full state
dicts on rank 0 through ``torch.distributed.checkpoint.state_dict``. With ``param_dtype=torch.bfloat16`` (the
trainer's ``fsdp_param_dtype``) parameters are gathered for the forward and backward in bf16 and gradients reduced
in float32 (``MixedPrecisionPolicy``), half the all-gather traffic; the optimizer keeps float32 shards. A mixer
holding parameters marked :func:`hylo.layers.base.keep_float32` (the recurrent operators' decay rates: rounding
``A_log`` to bf16 moves ``exp(A_log)`` by up to ~0.5%) is sharded on its own and gathered in float32. The CPU tests
run both with 2 gloo ranks; ``benchmarks/multi_gpu.py`` runs both on GPUs with NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module created the process group and destroys it in cleanup()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> DistInfo:
    """Join (or create, under torchrun) the process group and pick this rank's device."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = pick_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local, dev, owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = pick_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, 0, dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank, world, local, dev, owns_group=True)


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo, fsdp: bool = False,
         param_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """DDP or FSDP2 around ``model`` when distributed (FSDP2 gathering parameters in ``param_dtype``); the model
    itself otherwise."""
    if not info.distributed:
        return model
    if fsdp:
        shard_fsdp2(model, param_dtype)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def shard_fsdp2(model: torch.nn.Module, param_dtype: torch.dtype = torch.float32) -> None:
    """``fully_shard`` every block, then the root, in place (needs a process group). ``param_dtype`` other than
    float32: those gathers, float32 gradient reduction, and a float32 group for each mixer that
    :func:`~hylo.layers.base.holds_float32`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from hylo.layers.base import holds_float32

    kw = {}
    if param_dtype != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in model.layers:
            if holds_float32(block.mixer):
                fully_shard(block.mixer, mp_policy=fp32)  # its inputs are cast to float32 too
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HybridLM inside DDP / torch.compile wrappers (FSDP2 shards in place: the module itself)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
