"""Two CPU processes (gloo) against one process on the same global batches.

Every rank records the metrics rows it computed and its final ``state_dict`` (under
``rec/``, outside the run directories, which ranks other than 0 must not write), so the tests
compare every rank, not only the files rank 0 wrote.
"""

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

from gnc.config import TrainConfig
from gnc.saved_runs import evaluate_run
from gnc.training import Trainer, train

CFG = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 8}, model="ufm",
           feature_dim=12, epochs=12, lr=0.5, eval_every=4, progress=False, tau=2.0)
KEYS = ("train_loss", "nc1", "nc3", "top1", "avg_cos_margin", "wh_equinorm")
TEST_KEYS = ("test_top1", "test_nc1", "test_nc3", "test_avg_cos_margin")


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
    import gnc.rundir as rundir

    rundir.atomic_save = lambda obj, path: guarded_save(path)


def _worker(rank: int, world: int, port: int, root: str, jobs: list) -> None:
    """Run ``jobs`` (name, config dict, run dir under root/ddp, resume) in one process group.

    Each rank writes ``root/rec/<name>.rank<r>.json`` (every metrics row it computed) and
    ``.pt`` (its final state_dict).
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    root = Path(root)
    rec = root / "rec"
    rows: list[dict] = []
    real_log = Trainer.log

    def recording_log(self, row):
        rows.append(json.loads(json.dumps(row)))
        return real_log(self, row)

    Trainer.log = recording_log
    if rank != 0:
        _forbid_writes_under(root / "ddp")
    try:
        for name, cfg, run, resume in jobs:
            rows.clear()
            trainer = Trainer(TrainConfig(**cfg, device="cpu"), root / "ddp" / run,
                              resume=resume)
            trainer.fit()
            torch.save(trainer.model.state_dict(), rec / f"{name}.rank{rank}.pt")
            (rec / f"{name}.rank{rank}.json").write_text(json.dumps(rows))
    finally:
        torch.distributed.destroy_process_group()


def spawn(root: Path, jobs: list, world: int = 2) -> None:
    (root / "rec").mkdir(parents=True)
    mp.spawn(_worker, args=(world, free_port(), str(root), jobs), nprocs=world, join=True)


def rank_rows(root: Path, name: str, world: int = 2) -> list[list[dict]]:
    return [json.loads((root / "rec" / f"{name}.rank{r}.json").read_text())
            for r in range(world)]


def rank_states(root: Path, name: str, world: int = 2) -> list[dict]:
    return [torch.load(root / "rec" / f"{name}.rank{r}.pt", weights_only=False)
            for r in range(world)]


def rows(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_rows_match(got: list[dict], want: list[dict], keys, rel=1e-5, abs=1e-5):
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=abs), (a["epoch"], key)


def assert_states_match(got: dict, want: dict, atol=1e-5):
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key].double(), want[key].double(), atol=atol), key


def assert_ranks_agree(root: Path, name: str, keys) -> list[list[dict]]:
    """Every rank logged the same rows as rank 0 and holds the same state; returns the rows."""
    per_rank, states = rank_rows(root, name), rank_states(root, name)
    assert per_rank[0], "rank 0 recorded no metrics rows"
    for r in range(1, len(per_rank)):
        assert_rows_match(per_rank[r], per_rank[0], keys, rel=1e-9, abs=1e-12)
        assert_states_match(states[r], states[0], atol=1e-7)
    return per_rank


def write_npz(path, n_per_class=8, K=3, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, dim)) * 3
    y = np.repeat(np.arange(K), n_per_class)
    x = (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
    yt = np.repeat(np.arange(K), n_per_class // 2)
    xt = (centres[yt] + rng.normal(size=(len(yt), dim))).astype(np.float32)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return path


# the DDP runs of the tests below, all in one two-rank spawn (each spawn costs seconds)
METHOD_CASES = {"implicit": 16, "standard": 0, "fixed": 16}  # method: global batch size
BN_CFG = dict(model="mlp", width=16, feature_dim=8, epochs=3, batch_size=12, lr=0.05,
              method="implicit", progress=False, eval_every=1)  # + dataset=npz:PATH
RESUME_CFG = dict(CFG, method="implicit", batch_size=16, eval_every=1)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Root of the two-rank runs: ``ddp/<run>`` (rank 0's files) and ``rec/`` (every rank's)."""
    root = tmp_path_factory.mktemp("ddp")
    npz = write_npz(root / "data.npz")
    jobs = [(m, dict(CFG, method=m, batch_size=b), m, False) for m, b in METHOD_CASES.items()]
    jobs += [("bn", dict(BN_CFG, dataset=f"npz:{npz}"), "bn", False),
             ("full", {**RESUME_CFG, "epochs": 2}, "full", False),
             ("first", {**RESUME_CFG, "epochs": 1}, "split", False),
             ("resumed", {**RESUME_CFG, "epochs": 2}, "split", True)]
    spawn(root, jobs)
    return root


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_two_ranks_equal_one_process(ddp, tmp_path, method):
    cfg = dict(CFG, method=method, batch_size=METHOD_CASES[method])
    train(TrainConfig(**cfg, device="cpu"), tmp_path / "single")
    single = rows(tmp_path / "single")
    assert_rows_match(rows(ddp / "ddp" / method), single, KEYS)
    for got in assert_ranks_agree(ddp, method, KEYS):
        assert_rows_match(got, single, KEYS)
    cb = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=False)["model"]
    ca = torch.load(ddp / "ddp" / method / "checkpoints" / "last.pt",
                    weights_only=False)["model"]
    assert_states_match(ca, cb)
    for state in rank_states(ddp, method):
        assert_states_match(state, cb)
    if method == "implicit":
        assert "head.U" in cb and "head.tracker.H_bar_raw" in cb
    if method == "fixed":
        assert "head.mu_G" in cb and cb["head.mu_G"].abs().sum() > 0


def test_batchnorm_backbone_and_test_split(ddp):
    """An MLP with BatchNorm on an npz dataset with a test split: the ranks agree (metrics and
    every buffer, BatchNorm running statistics included), and the logged train and test
    metrics are those of the checkpoint rank 0 saved."""
    logged = rows(ddp / "ddp" / "bn")
    assert [r["epoch"] for r in logged] == [1, 2, 3]
    assert all(set(TEST_KEYS) <= r.keys() for r in logged)
    state = rank_states(ddp, "bn")[0]
    assert any(k.endswith("running_mean") for k in state)  # the backbone has BatchNorm
    assert_ranks_agree(ddp, "bn", KEYS + TEST_KEYS)
    for split, prefix in (("train", ""), ("test", "test_")):
        again = evaluate_run(ddp / "ddp" / "bn", split=split, device="cpu")
        for key in ("top1", "nc1", "nc3", "avg_cos_margin"):
            assert again[key] == pytest.approx(logged[-1][prefix + key], rel=1e-5, abs=1e-6), \
                (split, key)


def test_resume_under_ddp_gives_the_uninterrupted_result(ddp):
    """Stopped after epoch 1 and resumed to 2 on two ranks: every rank's rows and state equal
    the uninterrupted two-rank run's."""
    assert [r["epoch"] for r in rows(ddp / "ddp" / "split")] == [1, 2]
    full = assert_ranks_agree(ddp, "full", KEYS)
    first = assert_ranks_agree(ddp, "first", KEYS)
    resumed = assert_ranks_agree(ddp, "resumed", KEYS)
    for r in range(2):
        assert [row["epoch"] for row in first[r]] == [1]
        assert [row["epoch"] for row in resumed[r]] == [2]
        assert_rows_match(first[r] + resumed[r], full[r], KEYS, rel=1e-6, abs=1e-9)
    for a, b in zip(rank_states(ddp, "resumed"), rank_states(ddp, "full"), strict=True):
        assert_states_match(a, b, atol=1e-6)


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
    # again into the finished run, without --resume: rank 0 refuses; rank 1 went on into
    # DDP's set-up and died there ("Connection closed by peer", a traceback): now one line
    # each (torchrun then adds its own ChildFailedError report)
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "-m", "gnc", "train", *args, "--out",
                            str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode != 0
    out = again.stdout + again.stderr
    assert "already holds a run" in out and "refused by rank 0" in out, out
    assert "Connection closed" not in out and "training.py" not in out, out
