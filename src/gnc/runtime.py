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
import time
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


# --------------------------------------------------------------------------- timing


class StepTimer:
    """Forward and backward times of the steps of an epoch, without a host sync per step.

    ``mark()`` three times per step (start, after the loss, after the optimiser step); on
    CUDA the marks are events recorded in the stream and read once, in :meth:`times_ms`.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def times_ms(self) -> tuple[list[float], list[float]]:
        """Per step: (forward ms, backward ms)."""
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
            ms = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        else:
            ms = [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return ms[0::3], ms[1::3]


# --------------------------------------------------------------------------- seeds and RNGs


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (every device's) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's (CPU and every CUDA device's) RNGs, as
    plain data that ``torch.load(weights_only=True)`` reads: tensors, ints, floats, str.

    ``numpy``: ``{"name", "keys" (int64 tensor of the 624 words), "pos", "has_gauss",
    "cached_gaussian"}``; ``python``: ``{"version", "state" (the 625 ints), "gauss_next"}``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(w) for w in words],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_bytes(t: object, name: str) -> Tensor:
    """``t`` as the CPU ``ByteTensor`` that ``set_rng_state`` accepts."""
    if not isinstance(t, Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"the {name} RNG state is not a uint8 tensor")
    return t.cpu()


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numpy_state(s: object) -> tuple:
    """The tuple ``np.random.set_state`` takes, from :func:`rng_state`'s dict or (older
    checkpoints) NumPy's own tuple; ``ValueError`` for anything else."""
    if isinstance(s, dict):
        keys = s.get("keys")
        if not (isinstance(s.get("name"), str) and isinstance(keys, Tensor)
                and keys.dtype in (torch.int64, torch.uint32) and tuple(keys.shape) == (624,)
                and is_int(s.get("pos")) and is_int(s.get("has_gauss"))
                and isinstance(s.get("cached_gaussian"), float)):
            raise ValueError("the numpy RNG state is not {name, keys[624], pos, has_gauss, "
                             "cached_gaussian}")
        words = keys.to(torch.int64).numpy()
        if words.min() < 0 or words.max() >= 2**32:
            raise ValueError("the numpy RNG state's keys are not 32-bit words")
        return (s["name"], words.astype(np.uint32), s["pos"], s["has_gauss"],
                s["cached_gaussian"])
    if isinstance(s, tuple) and len(s) == 5 and isinstance(s[1], np.ndarray):
        return s
    raise ValueError(f"the numpy RNG state is a {type(s).__name__}, not a dict")


def _python_state(s: object) -> tuple:
    """The tuple ``random.setstate`` takes, from :func:`rng_state`'s dict or (older
    checkpoints) Python's own tuple; ``ValueError`` for anything else."""
    if isinstance(s, dict):
        words, gauss = s.get("state"), s.get("gauss_next")
        if not (is_int(s.get("version")) and isinstance(words, (list, tuple))
                and len(words) == 625 and all(is_int(w) for w in words)
                and (gauss is None or isinstance(gauss, float))):
            raise ValueError("the python RNG state is not {version, state[625], gauss_next}")
        return (s["version"], tuple(words), gauss)
    if isinstance(s, tuple) and len(s) == 3 and isinstance(s[1], tuple):
        return s
    raise ValueError(f"the python RNG state is a {type(s).__name__}, not a dict")


def check_rng_state(state: object) -> str | None:
    """What is wrong with ``state`` as :func:`set_rng_state` input, or None if nothing."""
    if not isinstance(state, dict):
        return f"the RNG states are a {type(state).__name__}, not a dict"
    missing = sorted({"torch", "numpy", "python"} - state.keys())
    if missing:
        return f"the RNG states lack {', '.join(missing)}"
    try:
        size, want = _cpu_bytes(state["torch"], "torch").numel(), torch.get_rng_state().numel()
        if size != want:  # set_rng_state would raise a RuntimeError
            return f"the torch RNG state has {size} bytes, not {want}"
        _numpy_state(state["numpy"])
        _python_state(state["python"])
        cuda = state.get("cuda", [])
        if not isinstance(cuda, (list, tuple)):
            return "the CUDA RNG states are not a list"
        for s in cuda:
            _cpu_bytes(s, "CUDA")
    except ValueError as err:
        return str(err)
    return None


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned, wherever its tensors were loaded; the form
    of older checkpoints (NumPy's and Python's own state tuples) too.

    CUDA states are restored for the devices present (a run saved on more GPUs than this
    machine has restores the first ones). ``ValueError`` for a malformed state, before any
    generator is changed.
    """
    problem = check_rng_state(state)
    if problem:
        raise ValueError(problem)
    torch.set_rng_state(_cpu_bytes(state["torch"], "torch"))
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_cpu_bytes(s, "CUDA"), i)


def summary_writer_class() -> type:
    """TensorBoard's ``SummaryWriter`` (``--tensorboard``), imported where a run is planned,
    so that a machine without tensorboard refuses the flag before any run directory exists."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(f"--tensorboard needs the tensorboard package ({err}); "
                         "pip install tensorboard, or leave the flag out") from None
    return SummaryWriter


def wrap_distributed(model: torch.nn.Module, info: DistInfo, device: torch.device
                     ) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` under ``torchrun`` (buffers not broadcast: the
    heads all-reduce their own statistics), else ``model`` itself."""
    if info.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False)
