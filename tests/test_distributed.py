"""Two CPU processes (gloo) against one process on the same global batches."""

import builtins
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gnc.training import TrainConfig, train

CFG = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 8}, model="ufm",
           feature_dim=12, epochs=12, lr=0.5, eval_every=4, progress=False, tau=2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forbid_writes_under(out: Path):
    """Make every write into `out` raise (for ranks other than 0)."""
    real_open, real_save = builtins.open, np.save

    def inside(path) -> bool:
        try:
            return Path(path).resolve().is_relative_to(out.resolve())
        except TypeError:
            return False

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            raise AssertionError(f"rank != 0 wrote {file}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_save(file, *args, **kwargs):
        if inside(file):
            raise AssertionError(f"rank != 0 wrote {file}")
        return real_save(file, *args, **kwargs)

    builtins.open, np.save = guarded_open, guarded_save
    Path.write_text = lambda self, *a, **k: guarded_open(self, "w").write(*a)
    import gnc.training as training

    training.atomic_save = lambda obj, path: guarded_save(path)


def _worker(rank: int, world: int, port: int, out: str, method: str, batch: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank != 0:
        _forbid_writes_under(Path(out))
    try:
        train(TrainConfig(**CFG, method=method, batch_size=batch, device="cpu"), out)
    finally:
        torch.distributed.destroy_process_group()


def rows(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,batch", [("implicit", 16), ("standard", 0)])
def test_two_ranks_equal_one_process(tmp_path, method, batch):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp"), method, batch), nprocs=2,
             join=True)
    train(TrainConfig(**CFG, method=method, batch_size=batch, device="cpu"), tmp_path / "single")
    ddp, single = rows(tmp_path / "ddp"), rows(tmp_path / "single")
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in single]
    for a, b in zip(ddp, single, strict=True):
        for key in ("train_loss", "nc1", "nc3", "top1", "avg_cos_margin", "wh_equinorm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    ca = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=False)["model"]
    cb = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for key in cb:
        assert torch.allclose(ca[key].double(), cb[key].double(), atol=1e-5), key
    if method == "implicit":
        assert "head.U" in cb and "head.tracker.H_bar_raw" in cb


def test_torchrun_entry_point(tmp_path):
    args = ["--preset", "ufm10", "--num-classes", "4", "--per-class", "8", "--feature-dim",
            "12", "--epochs", "6", "--eval-every", "3", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "-m", "gnc", "train", *args, "--out",
                    str(tmp_path / "ddp")], check=True, capture_output=True, env=env)
    subprocess.run([sys.executable, "-m", "gnc", "train", *args, "--out",
                    str(tmp_path / "single")], check=True, capture_output=True, env=env)
    a, b = rows(tmp_path / "ddp")[-1], rows(tmp_path / "single")[-1]
    for key in ("train_loss", "nc1", "top1", "avg_cos_margin"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
