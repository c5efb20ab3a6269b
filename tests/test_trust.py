"""A run directory is not a pickle sink; damaged checkpoint internals are one line or a
fallback; writes that fail name their file (docs/reliability.md, "Trust model")."""

import dataclasses
import errno
import itertools
import json
import logging
import pickle
import random
import shutil
import warnings

import numpy as np
import pytest
import torch

from gnc import rundir
from gnc.checkpoints import CHECKPOINT_KEYS, CheckpointError, load_checkpoint
from gnc.cli import main
from gnc.config import TrainConfig
from gnc.optim import OPTIMIZERS, SCHEDULERS
from gnc.rundir import atomic_save, atomic_write_text
from gnc.runtime import check_rng_state, rng_state, set_rng_state
from gnc.saved_runs import evaluate_run
from gnc.training import Trainer, train

TINY = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 8}, model="ufm",
            feature_dim=8, epochs=2, lr=0.5, progress=False, checkpoint_every=1)
TRAIN_ARGS = ["--dataset", "ufm", "--model", "ufm", "--num-classes", "4", "--per-class", "8",
              "--feature-dim", "8", "--lr", "0.5", "--checkpoint-every", "1", "--no-progress"]


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


class Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint could run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-epoch run with last.pt, epoch_0001.pt and epoch_0002.pt (copied per test)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(), run)
    return run


@pytest.fixture
def run(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / "run")


def only_last(run) -> None:
    for p in (run / "checkpoints").glob("epoch_*.pt"):
        p.unlink()


def snapshot(run) -> dict:
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def one_line_exit(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("gnc:")]
    assert exit_.value.code == 2 and len(err) == 1, err
    return err[0]


def old_format(ckpt: dict) -> dict:
    """``ckpt`` as an earlier gnc wrote it: NumPy's and Python's own RNG state objects."""
    return ckpt | {"rng": {"torch": ckpt["rng"]["torch"], "numpy": np.random.get_state(),
                           "python": random.getstate()}}


# --------------------------------------------------------------------------- pickles


def commands(run, payload_file):
    return {
        "evaluate": ["evaluate", str(run), "--device", "cpu"],
        "resume": ["train", "--out", str(run), "--epochs", "3", "--resume", *TRAIN_ARGS],
        "measure": ["measure", "--model", f"run:{run}", "--device", "cpu"],
        "measure --weights": ["measure", "--model", f"run:{run}", "--device", "cpu",
                              "--weights", str(payload_file)],
    }


@pytest.mark.parametrize("command", ["evaluate", "resume", "measure", "measure --weights"])
def test_a_planted_pickle_is_never_run(run, tmp_path, capsys, command):
    marker = tmp_path / "marker"
    payload = {"model": Payload(marker), "epoch": 1}
    if command == "measure --weights":  # the run is fine; the file given is not
        target = tmp_path / "payload.pt"
    else:
        only_last(run)
        target = run / "checkpoints" / "last.pt"
    torch.save(payload, target)
    before = snapshot(run)
    line = one_line_exit(capsys, commands(run, target)[command])
    assert not marker.exists()
    assert str(target) in line
    if command != "measure --weights":
        assert "--trust-checkpoint" in line
    assert snapshot(run) == before


def test_a_plain_pickle_as_weights_is_one_line_and_never_run(run, tmp_path, capsys):
    """A pickle written by ``pickle.dump`` (protocol 4): torch warned in four lines before
    gnc's one-line refusal."""
    marker, target = tmp_path / "marker", tmp_path / "plain.pkl"
    target.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=4))
    with warnings.catch_warnings(record=True) as shown, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main(commands(run, target)["measure --weights"])
    assert not [str(w.message) for w in shown]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "cannot read" in err[0] and "not unpickled" in err[0], err
    assert not marker.exists()


def test_checkpoints_are_read_as_weights_only(run):
    for path in (run / "checkpoints").glob("*.pt"):
        ckpt = torch.load(path, weights_only=True)
        assert set(ckpt) >= CHECKPOINT_KEYS


def test_an_old_checkpoint_loads_only_when_trusted(run, capsys, caplog):
    for path in (run / "checkpoints").glob("*.pt"):
        torch.save(old_format(torch.load(path, weights_only=True)), path)
    line = one_line_exit(capsys, ["evaluate", str(run), "--device", "cpu"])
    assert "last.pt" in line and "--trust-checkpoint" in line
    with caplog.at_level(logging.WARNING, logger="gnc.rundir"):
        main(["evaluate", str(run), "--device", "cpu", "--trust-checkpoint"])
    assert json.loads(capsys.readouterr().out)["epoch"] == 2
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"{run / 'checkpoints' / 'last.pt'}: an older checkpoint, unpickled in "
                      "full (--trust-checkpoint)"]
    main(["measure", "--model", f"run:{run}", "--device", "cpu", "--trust-checkpoint"])
    assert json.loads(capsys.readouterr().out.splitlines()[0])["epoch"] == 2
    # the resumed run writes its checkpoints as plain data
    main(["train", "--out", str(run), "--epochs", "3", "--resume", "--trust-checkpoint",
          *TRAIN_ARGS])
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 3


def test_trust_checkpoint_is_no_setting_of_the_run():
    assert "trust_checkpoint" not in {f.name for f in dataclasses.fields(TrainConfig)}


def test_measure_weights_of_a_gnc_checkpoint_read_as_weights_only(run, capsys):
    main(["measure", "--model", f"run:{run}", "--device", "cpu", "--weights",
          str(run / "checkpoints" / "epoch_0001.pt")])
    assert json.loads(capsys.readouterr().out.splitlines()[0])["epoch"] == 1


@pytest.mark.parametrize("optimizer,schedule", list(itertools.product(OPTIMIZERS, SCHEDULERS)))
def test_every_optimizer_and_schedule_round_trips_as_weights_only(tmp_path, optimizer,
                                                                  schedule):
    cfg = tiny(optimizer=optimizer, schedule=schedule, lr=0.05, epochs=2, checkpoint_every=0)
    train(cfg, tmp_path / "r")
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    trainer = Trainer(cfg, tmp_path / "r", resume=True)
    assert trainer.epoch == 2 and trainer.scheduler.state_dict() == ckpt["scheduler"]


# --------------------------------------------------------------------------- RNG states


def draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(),
            torch.rand(3).tolist())


def test_rng_state_round_trips_exactly_through_weights_only(tmp_path):
    random.gauss(0, 1)
    np.random.randn()  # a cached Gaussian in both
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = draws()
    draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == expected


def test_an_old_rng_state_still_restores():
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate()}
    expected = draws()
    set_rng_state(old)
    assert draws() == expected


@pytest.mark.parametrize("bad", [{}, {"torch": torch.get_rng_state(), "numpy": "x",
                                      "python": "y"}, "rng"])
def test_bad_rng_states_are_named_before_anything_changes(bad):
    assert check_rng_state(bad)
    state = torch.get_rng_state()
    with pytest.raises(ValueError):
        set_rng_state(bad)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------- damaged internals


def _set_numpy_x(ckpt):
    ckpt["rng"]["numpy"] = "x"


DAMAGE = {
    "rng={}": lambda c: c.update(rng={}),
    "optimizer='x'": lambda c: c.update(optimizer="x"),
    "optimizer={}": lambda c: c.update(optimizer={}),
    "step='abc'": lambda c: c.update(step="abc"),
    "scheduler=None": lambda c: c.update(scheduler=None),
    "rng.numpy='x'": _set_numpy_x,
    "epoch=-3": lambda c: c.update(epoch=-3),
    "epoch=10**6": lambda c: c.update(epoch=10**6),
    "epoch=True": lambda c: c.update(epoch=True),
    "step=10**30": lambda c: c.update(step=10**30),
    "rng.torch of 10 bytes": lambda c: c["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)),
    "epoch_stats={'loss': 'x'}": lambda c: c.update(epoch_stats={"loss": "x"}),
    "epoch_stats=[]": lambda c: c.update(epoch_stats=[]),
    "evaluated=1": lambda c: c.update(evaluated=1),
    "elapsed_s=-1.0": lambda c: c.update(elapsed_s=-1.0),
    "elapsed_s=nan": lambda c: c.update(elapsed_s=float("nan")),
    "elapsed_s='1'": lambda c: c.update(elapsed_s="1"),
}


def damage_inside(path, how: str) -> None:
    ckpt = torch.load(path, weights_only=True)
    DAMAGE[how](ckpt)
    torch.save(ckpt, path)


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_internals_fall_back_to_an_epoch_file(run, caplog, how):
    damage_inside(run / "checkpoints" / "last.pt", how)
    with caplog.at_level(logging.WARNING, logger="gnc.rundir"):
        trainer = Trainer(tiny(epochs=3), run, resume=True)
    assert trainer.epoch == 2
    assert "last.pt is damaged" in caplog.text and "falling back to" in caplog.text
    trainer.fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 3


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_internals_without_a_fallback_are_one_line(run, capsys, how):
    only_last(run)
    damage_inside(run / "checkpoints" / "last.pt", how)
    before = snapshot(run)
    line = one_line_exit(capsys, ["train", "--out", str(run), "--epochs", "3", "--resume",
                                  *TRAIN_ARGS])
    assert "last.pt is damaged" in line
    assert snapshot(run) == before
    line = one_line_exit(capsys, ["evaluate", str(run), "--device", "cpu"])
    assert "last.pt is damaged" in line


def test_another_runs_last_pt_is_refused(run, tmp_path, capsys, caplog):
    train(tiny(lr=0.1), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    with caplog.at_level(logging.WARNING, logger="gnc.rundir"):
        assert evaluate_run(run, device="cpu")["epoch"] == 2  # epoch_0002.pt
    assert "belongs to another run" in caplog.text and "lr=0.1 (now 0.5)" in caplog.text
    only_last(run)
    line = one_line_exit(capsys, ["train", "--out", str(run), "--epochs", "3", "--resume",
                                  *TRAIN_ARGS])
    assert "belongs to another run: differs from config.json in lr=" in line


def test_a_state_that_does_not_fit_the_optimizer_is_one_line(run, capsys):
    only_last(run)
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["optimizer"]["param_groups"] = []
    torch.save(ckpt, path)
    line = one_line_exit(capsys, ["train", "--out", str(run), "--epochs", "3", "--resume",
                                  *TRAIN_ARGS])
    assert f"the optimizer state in {path} does not fit" in line


def _momentum_x(ckpt):
    ckpt["optimizer"]["param_groups"][0]["momentum"] = "x"


def _buffer_shape(ckpt):
    state = ckpt["optimizer"]["state"]
    state[next(iter(state))]["momentum_buffer"] = torch.zeros(2)


def _betas(ckpt):
    ckpt["optimizer"]["param_groups"][0]["nesterov"] = 1.0


@pytest.mark.parametrize("damage,what", [
    (_momentum_x, "param group 0: momentum = 'x'"),
    (_buffer_shape, "momentum_buffer of shape (2,) for a parameter of shape"),
    (_betas, "param group 0: nesterov = 1.0"),
])
def test_optimizer_values_that_would_fail_the_first_step_are_one_line(run, capsys, damage,
                                                                      what):
    """torch's load_state_dict takes them; the first step failed with a traceback after
    config.json and metrics.jsonl were rewritten. Now refused before anything is written."""
    only_last(run)
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, path)
    before = snapshot(run)
    line = one_line_exit(capsys, ["train", "--out", str(run), "--epochs", "3", "--resume",
                                  *TRAIN_ARGS])
    assert f"the optimizer state in {path} does not fit ({what}" in line
    assert snapshot(run) == before


def test_a_model_state_that_does_not_fit_names_the_key_and_shapes(run):
    only_last(run)
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = torch.zeros(1, 2, 3)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=f"{path} does not fit the model: key '{key}' "
                       r"has shape \(1, 2, 3\) in the file but"):
        evaluate_run(run, device="cpu")
    with pytest.raises(CheckpointError, match=f"key '{key}' has shape"):
        Trainer(tiny(epochs=3), run, resume=True)


# --------------------------------------------------------------------------- writes


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")

    monkeypatch.setattr(torch, "save", full)
    path = tmp_path / "last.pt"
    with pytest.raises(OSError, match=f"^no space left on the device writing {path}$"):
        atomic_save({"epoch": 1}, path)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_training_is_one_line(run, capsys, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")

    monkeypatch.setattr(torch, "save", full)
    line = one_line_exit(capsys, ["train", "--out", str(run), "--epochs", "3", "--resume",
                                  *TRAIN_ARGS])
    assert line == ("gnc: error: no space left on the device writing "
                    f"{run / 'checkpoints' / 'last.pt'}")


def test_text_writes_name_the_file_on_enospc_and_permission(tmp_path, monkeypatch):
    def no_space(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", no_space)
    with pytest.raises(OSError, match=f"no space left on the device writing {tmp_path / 'x'}"):
        atomic_write_text(tmp_path / "x", "hello")

    def denied(file, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(rundir, "open", denied, raising=False)
    path = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(PermissionError, match=f"permission denied writing {path}"):
        atomic_save({"epoch": 1}, path)
    monkeypatch.setattr(rundir.os, "open", denied)  # append_line opens with os.open
    with pytest.raises(PermissionError, match=f"permission denied writing {tmp_path / 'm'}"):
        rundir.append_line(tmp_path / "m", "{}")


def test_stale_temporary_files_are_removed_on_resume(run, caplog):
    stale = [run / "checkpoints" / ".last.pt.4242.deadbeef.tmp",
             run / "checkpoints" / "last.pt.tmp", run / ".config.json.4242.cafe0000.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="gnc.rundir"):
        Trainer(tiny(epochs=3), run, resume=True)
    assert not any(p.exists() for p in stale)
    assert "temporary file" in caplog.text


def test_resume_drops_a_non_utf8_metrics_line(run):
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage\n")
    train(tiny(epochs=3), run, resume=True)
    text = (run / "metrics.jsonl").read_bytes().decode("utf-8")
    assert [json.loads(ln)["epoch"] for ln in text.splitlines()] == [1, 2, 3]


def test_experiment_passes_trust_checkpoint_on(tmp_path, monkeypatch):
    import gnc.experiments as experiments

    seen = {}
    monkeypatch.setattr(experiments, "run_experiment", lambda *a, **kw: seen.update(kw))
    main(["experiment", "ufm10", "--out", str(tmp_path), "--no-report", "--trust-checkpoint"])
    assert seen["trust_checkpoint"] is True


# --------------------------------------------------------------------------- links


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(run, tmp_path, capsys):
    """``open(".lock", "a+")`` followed a link and truncated its target to a PID: a run
    directory from someone else could point ``.lock`` at any file of the user's."""
    victim = tmp_path / "victim.txt"
    victim.write_text("DATA\n")
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(victim)
    for argv in (["evaluate", str(run), "--all", "--device", "cpu"],
                 ["train", "--out", str(run), "--epochs", "3", "--resume", *TRAIN_ARGS]):
        line = one_line_exit(capsys, argv)
        assert ".lock is a symbolic link" in line
    assert victim.read_text() == "DATA\n"


def test_metrics_lines_are_not_appended_through_a_link(run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("DATA\n")
    (run / "evaluate_train.jsonl").symlink_to(victim)
    line = one_line_exit(capsys, ["evaluate", str(run), "--all", "--device", "cpu"])
    assert "evaluate_train.jsonl is a symbolic link" in line
    assert victim.read_text() == "DATA\n"


def test_only_gncs_own_temporaries_are_removed(run):
    ours = [run / ".metrics.jsonl.123.0a1b2c3d.tmp", run / "checkpoints" / "last.pt.tmp",
            run / "checkpoints" / ".last.pt.77.deadbeef.tmp", run / "config.json.tmp"]
    theirs = [run / "notes.tmp", run / "checkpoints" / "upload.tmp", run / ".x.tmp"]
    for p in ours + theirs:
        p.write_text("x")
    assert sorted(rundir.remove_stale_temporaries(run)) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)
