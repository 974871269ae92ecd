"""Data parallel training without a wrapper: the same recipe on 1 process or N (torchrun / accelerate).

``torchrun --nproc_per_node N -m edgepack distill train …`` or ``accelerate launch -m edgepack
distill train …`` set ``WORLD_SIZE``/``RANK`` (and the rendezvous variables); :func:`from_env`
then joins the process group (NCCL when the processes train on CUDA, gloo otherwise: device.py). Every rank builds the same example
order (batch_indices is a pure function of seed and step), takes every N-th micro-batch of
each optimizer step, and the gradients are summed across ranks before the identical optimizer
step on every rank. Per-token weights are computed over the *global* batch, so N processes
reproduce one process's step at the same global batch size (up to float summation order).
Rank 0 alone writes checkpoints and the final student; the others wait at a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from edgepack.distill.device import CPU, Device, ddp_backend

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    """Where the collectives' tensors live (NCCL reduces CUDA tensors only)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_share(self, items: Sequence[T]) -> list[T]:
        """This rank's micro-batches of one optimizer step (round robin)."""
        return list(items[self.rank::self.world])

    def sum_gradients(self, params: Sequence[Any]) -> None:
        """Sum every parameter's gradient over the ranks (a rank with no micro-batch adds zeros)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of Python numbers over the ranks (loss totals, token counts)."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def from_env(device: Device = CPU) -> DataParallel:
    """The launch's data-parallel group (joined once; NCCL for CUDA processes, gloo otherwise: device.py);
    a plain ``python`` process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DataParallel()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.name == "cuda":  # each process its own GPU, by its local rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=ddp_backend(device.name))
    return DataParallel(rank=dist.get_rank(), world=dist.get_world_size(), device=device.name)
