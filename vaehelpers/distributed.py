"""Several processes, one run: joining the process group (torchrun or launch.py) and the few collectives train() needs.

Data parallel in the usual way: every rank holds the whole model and takes its share b[rank::world] of each
global batch (batch_size is the GLOBAL batch); DistributedDataParallel averages the autoencoder's gradients,
so N ranks take the same optimiser steps as one process on the whole batch (exactly so up to float rounding
with sample_posterior=False; with sampling each rank draws its own noise). Rank 0 alone writes logs, figures
and checkpoints; every rank reads the same checkpoint when resuming, so --run must be on a filesystem that
every node sees. The PatchGAN discriminator is not DDP-wrapped: its gradients are averaged by hand (see
Distributed.average_gradients). With the GAN on, LDM's adaptive weight and the discriminator's BatchNorm
statistics come from each rank's own share of the batch, as in LDM's multi-GPU training, so there N ranks
train like one process only approximately.

    torchrun --standalone --nproc_per_node 2 -m vaehelpers train --data DIR --run-dir DIR ...  # a script
    vaehelpers.launch.launch(cfg, nproc=2)                                             # a notebook (Kaggle T4x2)

(--run-dir, not --run: torchrun's own parser reads "--run" as an abbreviation of its "--run-path".)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vaehelpers.runtime import resolve_device

# How long a collective waits for a rank that does not come (then every rank fails with an error rather than
# hanging). Generous by default: the other ranks wait at the next step while rank 0 validates and writes files.
TIMEOUT_ENV = "VAEHELPERS_DIST_TIMEOUT"  # seconds
DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class Distributed:
    """This process's place in a distributed job (rank 0 of 1, doing nothing, when not distributed).

    Every method is a collective when `enabled`: all ranks must call it, in the same order.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # init_distributed() created the process group, so close() destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to call in training: DistributedDataParallel (gradients averaged in backward) or itself."""
        if not self.enabled:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def agree(self, value: float, op: str) -> float:
        """The min or max of a number over all ranks, so that every rank takes the same branch."""
        if not self.enabled:
            return value
        tensor = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
        return float(tensor)

    def mean(self, logs: dict[str, float]) -> dict[str, float]:
        """Each value averaged over ranks: with equal shards, the value on the whole global batch."""
        if not self.enabled or not logs:
            return logs
        values = torch.tensor(list(logs.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(logs, (values / self.world_size).tolist()))

    def average_gradients(self, module: nn.Module) -> None:
        """Do by hand what DDP does for a wrapped module: average the grads, copy rank 0's buffers.

        Used for the PatchGAN discriminator, which the loss module calls in two graphs (the generator's
        adversarial term and its own hinge loss); wrapping it in DDP would sync it in the generator's backward too.
        Its BatchNorm statistics stay per rank within a step, as under DDP (no SyncBatchNorm, as in LDM).
        """
        if not self.enabled:
            return
        for parameter in module.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad.div_(self.world_size)
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's copy of a same-shaped tensor, in rank order (on CPU)."""
        if not self.enabled:
            return [tensor.cpu()]
        mine = tensor.to(self.device)  # NCCL gathers device tensors only
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        return [t.cpu() for t in everyone]

    def check_in_sync(self, **states: dict[str, Tensor] | list[Tensor] | None) -> None:
        """Raise if any rank's weights differ from rank 0's (they are bit-identical unless something is broken).

        Compares an exact fingerprint per tensor (the int64 sum of its raw bits: order-free, so the same on
        any device), e.g. check_in_sync(model=model.state_dict(), ema=ema.shadow).
        """
        if not self.enabled:
            return
        named = {
            f"{group}.{key}": tensor
            for group, tensors in states.items()
            if tensors is not None
            for key, tensor in (tensors.items() if isinstance(tensors, dict) else enumerate(tensors))
        }
        fingerprints = self.gather(torch.stack([_bits_sum(t) for t in named.values()]))  # world x (n,)
        for rank, theirs in enumerate(fingerprints[1:], start=1):
            differing = (theirs != fingerprints[0]).nonzero().flatten().tolist()
            if differing:
                names = list(named)
                more = f" (and {len(differing) - 1} more tensors)" if len(differing) > 1 else ""
                raise RuntimeError(
                    f"rank {rank}'s copy of {names[differing[0]]}{more} differs from rank 0's: the "
                    "processes have drifted apart, which is a bug; please report it"
                )

    def close(self) -> None:
        """Wait for every rank (rank 0 writes the final files meanwhile), then leave the process group."""
        if not self.enabled:
            return
        dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.owns_group:
            dist.destroy_process_group()


def _bits_sum(tensor: Tensor) -> Tensor:
    """The int64 sum of a tensor's elements read as integers of the same width: exact and order-free."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().contiguous().view(-1).view(as_int).long().sum()


def init_distributed(device_name: str = "auto") -> Distributed:
    """Join the process group when torchrun (or launch) set RANK and WORLD_SIZE > 1; else a single process.

    One GPU per process: under DDP "auto" and "cuda" mean this process's GPU, cuda:LOCAL_RANK (NCCL);
    on CPU the ranks talk over gloo. The group's timeout is $VAEHELPERS_DIST_TIMEOUT seconds (default 30 min).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world_size <= 1:
        return Distributed(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
            "start at most one process per GPU (--nproc_per_node)"
        )
    device = resolve_device(f"cuda:{local_rank}" if use_cuda else device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Distributed(rank, local_rank, world_size, device, owns_group)
