import importlib.util
import math
import os
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch

from gnc.etf import centering


def random_stiefel(d: int, K: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)  # distinct from the global seed
    Q, _ = torch.linalg.qr(torch.randn(d, K, generator=g, dtype=torch.float64))
    return Q.to(dtype)


def random_means(d: int, K: int, seed: int = 0) -> torch.Tensor:
    """Centred, Frobenius-normalised random class means (d×K, float64)."""
    g = torch.Generator().manual_seed(1000 + seed)  # distinct from the global seed
    H = torch.randn(d, K, generator=g, dtype=torch.float64) @ centering(K)
    return H / H.norm()


def near_etf_means(d: int, K: int, seed: int = 0, noise: float = 1e-3) -> torch.Tensor:
    """Class means within `noise` of an exact simplex ETF ``U0 M/√(K−1)``."""
    g = torch.Generator().manual_seed(seed + 1)
    H = random_stiefel(d, K, seed) @ centering(K) / math.sqrt(K - 1)
    H = H + noise * torch.randn(d, K, generator=g, dtype=torch.float64) @ centering(K)
    return H / H.norm()


def stop_after_first_checkpoint(cmd: list[str], out: Path, stderr: Path,
                                sig: int = signal.SIGKILL) -> subprocess.Popen:
    """Start ``cmd`` (an experiment into ``out``) in a session of its own and send ``sig`` to
    it and its processes once a run has written its first ``epoch_*.pt``; returns it, ended
    (its stderr in ``stderr``)."""
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not any(out.glob("*/seed*/checkpoints/epoch_*.pt")):
                assert proc.poll() is None, stderr.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)
    return proc


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_benchmark(script: str, name: str | None = None) -> types.ModuleType:
    """``benchmarks/SCRIPT.py`` as a module named ``name`` (default ``script``): the
    benchmarks are scripts, not part of gnc."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(name or script, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

