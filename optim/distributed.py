"""One run trained by several processes: torchrun and DistributedDataParallel (docs/method.md
§14). Started by `torchrun --nproc-per-node N train.py --config ...`; NCCL between GPUs, gloo on
CPUs.

Every process draws the same global batch (order, masks, DropPath noise) from the epoch's
generator and trains on its share of the rows (`Shard.rows`). What makes S5VH more than plain
DDP: the contrastive loss sees the codes of the whole global batch (`gather_rows`, whose
gradient flows back to the process that made each code), the label table is updated
identically everywhere (`gather_rows` of the updated rows), and each process's share of the
row-averaged losses is weighted by its rows, so that DDP's average of the gradients is the
gradient of the global batch's loss even when the last batch does not split evenly.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError

class ShardError(UserError):
    """A problem of the processes of a data-parallel run."""


@dataclass
class Shard:
    """This process's place among the `world` processes of one run."""
    rank: int
    world: int
    device: torch.device

    @property
    def writes(self):
        """Only the first process writes the run directory."""
        return self.rank == 0

    def sizes(self, count):
        """How the `count` rows of a global batch are split: near-equal, the first processes
        taking one more when it does not divide."""
        base, extra = divmod(count, self.world)
        return [base + (r < extra) for r in range(self.world)]

    def rows(self, count):
        """This process's rows of a global batch of `count`, as a slice."""
        sizes = self.sizes(count)
        start = sum(sizes[:self.rank])
        return slice(start, start + sizes[self.rank])

    def weight(self, count):
        """Factor of this process's row-averaged losses: DDP averages over processes."""
        return self.sizes(count)[self.rank] * self.world / count


def from_environment(device, timeout):
    """The Shard of this process when torchrun started several (WORLD_SIZE > 1), else None;
    joins the process group (NCCL on CUDA, gloo on the CPU). `timeout`: seconds a process waits
    for the others at a collective (the first evaluates while they wait) before it stops with
    one line."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise ShardError("several processes on GPUs need NCCL, which this torch lacks")
        if local >= torch.cuda.device_count():
            raise ShardError(f"process {rank} would use GPU {local}, but only "
                             f"{torch.cuda.device_count()} are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return Shard(rank, world, device)


def check_batch(shard, batch_size):
    if shard is not None and batch_size % shard.world:
        raise ShardError(f"train.batch_size={batch_size} does not split over {shard.world} "
                         f"processes; choose a multiple of {shard.world}")


def agree(shard, error):
    """Every process learns whether any of them failed a step (the error message of the first
    that did, or None), so that all stop together with one line instead of waiting."""
    messages = [None] * shard.world
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed and error is None:
        rank, message = failed[0]
        raise ShardError(f"process {rank} of this run stopped: {message}")


class _GatherRows(torch.autograd.Function):
    """All processes' rows, concatenated in rank order; the gradient of each row goes back to
    the process that made it (summed over the processes that used it)."""

    @staticmethod
    def forward(ctx, local, sizes):
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = local.new_zeros((max(sizes),) + local.shape[1:])
        padded[:len(local)] = local
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_rows(local, sizes):
    """(n_r, ...) rows of every process r -> (sum n_r, ...), differentiable."""
    return _GatherRows.apply(local, sizes)


def any_process(flag, device):
    """True on every process when `flag` is true on any (a signal reaches them at different
    steps; they must stop after the same epoch)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_processes(tensor):
    """The mean of a tensor over the processes (in place)."""
    dist.all_reduce(tensor)
    return tensor.div_(dist.get_world_size())


def lost_process(error):
    """Whether an error of a collective means another process died or stopped answering (gloo
    and NCCL raise RuntimeErrors that say so)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return any(word in text for word in ("gloo", "NCCL", "Connection", "timed out",
                                         "Timeout", "Broken pipe"))


def close():
    if dist.is_initialized():
        dist.destroy_process_group()
