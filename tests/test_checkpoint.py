"""Run directories that survive crashes, other devices, second runs and moved data."""

import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

import gnc.runtime as runtime
import gnc.training as training
from gnc.checkpoints import CHECKPOINT_KEYS, CheckpointError, load_checkpoint
from gnc.cli import build_parser, main
from gnc.config import TrainConfig
from gnc.rundir import atomic_save, resolve_data_paths
from gnc.saved_runs import evaluate_run
from gnc.training import Trainer, train

TINY = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 8}, model="ufm",
            feature_dim=8, epochs=2, lr=0.5, progress=False)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def epochs_logged(run) -> list[int]:
    return [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-epoch run with last.pt, epoch_0001.pt and epoch_0002.pt (copied per test)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(checkpoint_every=1), run)
    return run


@pytest.fixture
def run(finished, tmp_path):
    import shutil

    return shutil.copytree(finished, tmp_path / "run")


# --------------------------------------------------------------------------- 1. devices


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")
def test_resume_onto_another_device_keeps_rng_states_on_the_cpu(run, monkeypatch):
    # 'meta' stands in for CUDA: loading with map_location=<the device> moved the RNG
    # states there too, and torch.set_rng_state accepts only a CPU ByteTensor.
    monkeypatch.setattr(training, "resolve_device", lambda name, info: torch.device("meta"))
    seen = []
    real = torch.set_rng_state
    monkeypatch.setattr(torch, "set_rng_state", lambda s: (seen.append(s), real(s)))
    trainer = Trainer(tiny(epochs=3, checkpoint_every=1), run, resume=True)
    assert trainer.epoch == 2
    assert next(trainer.model.parameters()).device.type == "meta"
    assert seen and all(s.device.type == "cpu" and s.dtype == torch.uint8 for s in seen)


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    ckpt = {k: {} for k in CHECKPOINT_KEYS} | {"epoch": 1, "step": 1}
    ckpt["model"] = {"w": torch.ones(3)}
    ckpt["optimizer"] = {"state": {}, "param_groups": []}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [
        torch.zeros(16, dtype=torch.uint8)]  # a CUDA generator's state: seed and offset
    ckpt["rng"] = runtime.rng_state() | {"cuda": cuda}
    with monkeypatch.context() as m:  # tag every storage as CUDA's, as a GPU run does
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        atomic_save(ckpt, tmp_path / "last.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does here
            torch.load(tmp_path / "last.pt", weights_only=False)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["rng"]["torch"].device.type == "cpu"
    assert loaded["rng"]["torch"].dtype == torch.uint8
    assert loaded["model"]["w"].device.type == "cpu"
    assert all(s.device.type == "cpu" for s in loaded["rng"]["cuda"])
    runtime.set_rng_state(loaded["rng"])


def test_torchrun_with_auto_device_on_gpus_uses_nccl_after_set_device(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = runtime.init_distributed("auto")
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    calls.clear()
    runtime.init_distributed("cpu")
    assert calls == [("init", "gloo")]


# --------------------------------------------------------------------------- 3. a second run


def test_a_second_run_into_a_run_directory_is_refused(run):
    before = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "config.json")}
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny(lr=0.1), run)
    assert {p: p.read_bytes() for p in before} == before


def test_overwrite_replaces_the_old_run(run):
    (run / "DONE").write_text("finished\n")
    train(tiny(epochs=1, lr=0.1), run, overwrite=True)
    assert epochs_logged(run) == [1]
    assert json.loads((run / "config.json").read_text())["lr"] == 0.1
    assert not (run / "DONE").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    with pytest.raises(ValueError, match="resume.*overwrite"):
        train(tiny(), run, resume=True, overwrite=True)


def test_empty_and_unstarted_directories_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    train(tiny(epochs=1), tmp_path / "empty")
    started = tmp_path / "started"  # killed before its first checkpoint
    (started / "checkpoints").mkdir(parents=True)
    (started / "config.json").write_text("{}")
    (started / "metrics.jsonl").write_text("")
    train(tiny(epochs=1), started)
    assert epochs_logged(started) == [1]


def test_cli_refuses_a_second_train_in_one_line_and_overwrites_when_asked(run, capsys):
    args = ["train", "--out", str(run), "--dataset", "ufm", "--model", "ufm", "--num-classes",
            "4", "--per-class", "8", "--feature-dim", "8", "--epochs", "1", "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert build_parser().parse_args(args + ["--overwrite"]).overwrite
    main(args + ["--overwrite"])
    assert epochs_logged(run) == [1]


# --------------------------------------------------------------------------- 4. damage


def damage(path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        torch.save([1, 2, 3], path)


@pytest.mark.parametrize("how", ["empty", "truncated", "foreign", "not a dict"])
def test_load_checkpoint_names_the_file_and_the_damage(run, how):
    path = run / "checkpoints" / "last.pt"
    damage(path, how)
    with pytest.raises(CheckpointError, match=f"{path}.*(empty|truncated|not a gnc)") as err:
        load_checkpoint(path)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("how", ["empty", "truncated", "foreign"])
def test_nothing_readable_is_one_clear_line(run, how):
    for p in (run / "checkpoints").glob("*.pt"):
        damage(p, how)
    with pytest.raises(ValueError, match=f"cannot resume {run}: no readable checkpoint"):
        train(tiny(epochs=3, checkpoint_every=1), run, resume=True)
    with pytest.raises(ValueError, match=f"cannot evaluate {run}: no readable checkpoint"):
        evaluate_run(run, device="cpu")


def test_a_damaged_last_pt_falls_back_to_the_newest_epoch_checkpoint(run, caplog):
    damage(run / "checkpoints" / "last.pt", "truncated")
    damage(run / "checkpoints" / "epoch_0002.pt", "empty")
    with caplog.at_level(logging.WARNING, logger="gnc.rundir"):
        assert evaluate_run(run, device="cpu")["epoch"] == 1
    assert "falling back to" in caplog.text and "epoch_0001.pt (epoch 1)" in caplog.text
    trainer = Trainer(tiny(epochs=3, checkpoint_every=1), run, resume=True)
    assert trainer.epoch == 1 and epochs_logged(run) == [1]  # epoch 2's row is re-made
    trainer.fit()
    assert epochs_logged(run) == [1, 2, 3]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 3


def test_resume_drops_a_torn_last_metrics_line(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"no_epoch": 1}\n{"epoch": 3, "train_lo')  # killed mid-write
    train(tiny(epochs=3, checkpoint_every=1), run, resume=True)
    assert epochs_logged(run) == [1, 2, 3]


def test_cli_evaluate_of_a_damaged_run_is_one_line(run, capsys):
    for p in (run / "checkpoints").glob("*.pt"):
        damage(p, "truncated")
    with pytest.raises(SystemExit):
        main(["evaluate", str(run), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt is truncated" in err[0]


# --------------------------------------------------------------------------- 5. data paths


def test_evaluate_finds_relative_data_from_another_directory(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    x = (rng.normal(size=(3, 6)) * 3)[y] + rng.normal(size=(len(y), 6))
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    np.savez(project / "data" / "toy.npz", x=x.astype(np.float32), y=y)
    monkeypatch.chdir(project)
    cfg = TrainConfig(dataset="npz:data/toy.npz", model="mlp", width=8, feature_dim=8,
                      epochs=2, lr=0.05, progress=False)
    row = train(cfg, "runs/a")
    assert json.loads((project / "runs/a/config.json").read_text())["dataset"] == cfg.dataset
    monkeypatch.chdir(elsewhere)
    again = evaluate_run(project / "runs" / "a", device="cpu")
    assert again["top1"] == pytest.approx(row["top1"])


def test_resolve_data_paths_rule(tmp_path, monkeypatch):
    run, train_cwd, here = tmp_path / "run", tmp_path / "was_here", tmp_path / "here"
    for d in (run / "data", train_cwd / "data", here / "data"):
        d.mkdir(parents=True)
    (run / "x.npz").touch()
    monkeypatch.chdir(here)
    cfg = {"dataset": "npz:x.npz", "data_dir": "data"}
    assert resolve_data_paths(cfg, run, str(train_cwd)) == {  # the cwd's data dir wins
        "dataset": f"npz:{run / 'x.npz'}", "data_dir": "data"}
    (here / "data").rmdir()
    assert resolve_data_paths(cfg, run, str(train_cwd))["data_dir"] == str(train_cwd / "data")
    assert resolve_data_paths(cfg, run, None)["data_dir"] == str(run / "data")
    missing = {"dataset": "imagefolder:nowhere", "data_dir": "/abs/data"}
    assert resolve_data_paths(missing, run, str(train_cwd)) == missing


# --------------------------------------------------------------------------- 6. writes


def test_atomic_save_fsyncs_the_temporary_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_save({"epoch": 1}, tmp_path / "last.pt")
    tmp = next(path for what, path in events if what == "replace")
    assert os.path.basename(tmp).startswith(f".last.pt.{os.getpid()}.") and tmp.endswith(".tmp")
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp))
    assert torch.load(tmp_path / "last.pt", weights_only=False) == {"epoch": 1}


def test_a_killed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def dying_save(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_metrics_lines_are_fsynced(run, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (
        synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    train(tiny(epochs=3, checkpoint_every=1), run, resume=True)
    assert str(run / "metrics.jsonl") in synced


def test_resuming_a_run_of_the_older_data_order_says_so(tmp_path, caplog):
    """Data orders were seeded by seed + epoch before gnc.data.sampler.epoch_seed: a run
    checkpointed then goes on in the new orders, and its resume says so (once, rank 0)."""
    run = tmp_path / "run"
    train(tiny(epochs=4, until_epoch=2), run)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt.pop("data_order") == 2
    atomic_save(ckpt, run / "checkpoints" / "last.pt")
    with caplog.at_level(logging.WARNING, logger="gnc.checkpoints"):
        train(tiny(epochs=4), run, resume=True)
    assert "started by an older gnc" in caplog.text and "from 3 on" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gnc.checkpoints"):
        train(tiny(epochs=5), run, resume=True)  # its own checkpoints carry the key now
    assert "older gnc" not in caplog.text


def test_a_data_order_that_is_no_integer_is_a_damaged_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(tiny(), run)
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    atomic_save({**ckpt, "data_order": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="its data_order is not an integer"):
        load_checkpoint(path)
