"""Where a run executes: devices, the process group, seeds and RNG states, collectives.

The one place that parses a device name (:func:`check_device`, :func:`resolve_device`),
joins ``torchrun``'s process group (:func:`init_distributed`) and asks whether one is
running (:func:`is_distributed`); the collectives here are plain copies in a single process,
so the code that calls them reads the same with or without DDP. Imports torch only: the
mathematical core (heads, metrics) uses it too.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistInfo:
    """This process's place in the process group (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --------------------------------------------------------------------------- devices


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (``auto`` = cpu
    here: resolving it needs :func:`resolve_device`); ``ValueError`` for a name torch does
    not know or CUDA asked for where there is none. Initialises nothing."""
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"Expected `device` to be auto, cpu, cuda or cuda:N, but got "
                         f"{name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Expected `device` to be auto, cpu, cuda or cuda:N, but got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but no CUDA device is available")
    return device


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """The ``torch.device`` of ``name`` for this rank; a GPU is made the current device.

    ``auto`` is CUDA when available, else the CPU; ``cuda`` without an index is the
    ``LOCAL_RANK``-th GPU under ``torchrun`` (GPU 0 otherwise).
    """
    info = info or DistInfo()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.world_size > 1 else 0)
        torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- process group


def is_distributed() -> bool:
    """Whether a process group is running (``torchrun`` with ``WORLD_SIZE > 1``)."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    The device is resolved first (``auto`` → this rank's GPU when CUDA is present) and made
    current with ``torch.cuda.set_device`` before the group is created; the backend is NCCL
    whenever that device is a GPU, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        info = DistInfo(int(os.environ.get("RANK", 0)), world, local_rank)
        backend = "nccl" if resolve_device(device, info).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _comm_device(device: torch.device) -> torch.device:
    """NCCL only reduces CUDA tensors; every other backend reduces tensors where they are."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """A summed copy of ``tensor`` over all ranks (a plain copy in a single process)."""
    if not is_distributed():
        return tensor.clone()
    out = tensor.to(_comm_device(tensor.device), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks in place (nothing in a single process); returns it."""
    if is_distributed():
        tensor.copy_(all_reduce_sum(tensor))
    return tensor


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over all ranks in place (nothing in a single process)."""
    if is_distributed():
        all_reduce_sum_(tensor)
        tensor /= dist.get_world_size()
    return tensor


def differentiable_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all ranks with the gradient flowing back to every rank's part
    (``torch.distributed.nn.functional.all_reduce``); ``tensor`` itself in a single process."""
    if not is_distributed():
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Sums of host numbers over the ranks (the values themselves in a single process)."""
    if not is_distributed():
        return values
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenation (in rank order) of the 1-D tensors of all ranks, of varying lengths."""
    if not is_distributed():
        return tensor.clone()
    device = _comm_device(tensor.device)
    world = dist.get_world_size()
    size = torch.tensor([tensor.numel()], device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=tensor.dtype, device=device)
    padded[: tensor.numel()] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, lengths, strict=True)]).to(tensor.device)


# --------------------------------------------------------------------------- seeds and RNGs


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (every device's) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's (CPU and every CUDA device's) RNGs."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_bytes(t: object, name: str) -> Tensor:
    """``t`` as the CPU ``ByteTensor`` that ``set_rng_state`` accepts."""
    if not isinstance(t, Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"the {name} RNG state is not a uint8 tensor")
    return t.cpu()


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned, wherever its tensors were loaded.

    CUDA states are restored for the devices present (a run saved on more GPUs than this
    machine has restores the first ones).
    """
    torch.set_rng_state(_cpu_bytes(state["torch"], "torch"))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_cpu_bytes(s, "CUDA"), i)
