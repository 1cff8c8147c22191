"""Data-parallel training under torchrun: which rank this process is, its device, the process
group (NCCL on GPUs, gloo on the CPU) and the sums across ranks. A plain `python train.py` is
rank 0 of 1, and every function here then does nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from cli import UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's: its global rank, their number, its rank on this
    machine (which GPU it drives)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process prints, draws and writes (rank 0)."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


SINGLE = Ranks()  # a plain `python train.py`
RANK_VARIABLES = (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))


def from_environment(environ=os.environ) -> Ranks:
    """The ranks torchrun announces in RANK, WORLD_SIZE and LOCAL_RANK; one process without."""
    try:
        ranks = Ranks(*(int(environ.get(k, d)) for k, d in RANK_VARIABLES))
    except ValueError:
        found = ", ".join(f"{k}={environ.get(k)}" for k, _ in RANK_VARIABLES)
        raise UserError(f"torchrun's {found}: not whole numbers") from None
    if not 0 <= ranks.rank < ranks.world or ranks.local_rank < 0:
        raise UserError(f"RANK {ranks.rank} of WORLD_SIZE {ranks.world}: not a rank of the run")
    return ranks


def device_name(given: str | None, ranks: Ranks, cuda_available: bool) -> str | None:
    """The --device of this rank: with several ranks and CUDA (unless --device says cpu), the
    GPU of its local rank; else `given` as it is."""
    if ranks.world == 1 or not cuda_available or given not in (None, "cuda"):
        return given
    return f"cuda:{ranks.local_rank}"


def start(ranks: Ranks, device: torch.device) -> None:
    """Join torchrun's process group: NCCL between GPUs, gloo between CPU processes."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def wait_for_all(ranks: Ranks) -> None:
    """Return when every rank has come here: the ranks of a finished run leave together (a rank
    that tears gloo down while rank 0 still writes its results can abort at exit)."""
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def stop(ranks: Ranks) -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """`net` as it trains: under DistributedDataParallel when there are several ranks (gradients
    averaged across them at every step), else `net` itself."""
    if ranks.world == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None
    )


def reduce(values: torch.Tensor, ranks: Ranks, op: str = "sum") -> torch.Tensor:
    """`values` summed (or their minimum, `op="min"`) across the ranks, in place."""
    if ranks.world > 1:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return values


def share_buffers(net: nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics, which each rank updated from its
    own shard), so that all ranks validate the network rank 0 saves."""
    if ranks.world > 1:
        import torch.distributed as dist

        for buffer in net.buffers():
            dist.broadcast(buffer, 0)


def gather(value, ranks: Ranks) -> list:
    """Every rank's `value`, in rank order (a list of one without torchrun)."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values
