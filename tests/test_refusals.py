"""The reliability issue's refusals: one writer per run directory, ``--resume`` with fewer
epochs, files replaced without ``--overwrite``, npz and image inputs checked at load time,
typed config values, Ctrl-C during start-up. Each is one line (exit 2) and changes nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gnc.config import TrainConfig
from gnc.data import load_dataset
from gnc.data.device import ImageDecodeError
from gnc.rundir import LOCK_FILE, RunLockedError, holds_results, run_lock
from gnc.training import Trainer
from test_cli import TINY_UFM, assert_one_line_error, run_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock file) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def tiny_run(out: Path, capsys, *extra: str) -> None:
    code, err = run_main(["train", "--preset", "ufm10", "--epochs", "2", *TINY_UFM,
                          "--device", "cpu", "--out", out, *extra], capsys)
    assert code == 0, err


@pytest.fixture
def holder(tmp_path):
    """Start a child process that holds the lock of a directory; yields (dir, process)."""
    procs = []

    def start(run_dir: Path) -> subprocess.Popen:
        code = ("import sys, time\nfrom gnc.rundir import run_lock\n"
                "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n"
                "    time.sleep(120)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=ENV,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- A: the lock


def test_run_lock_is_exclusive_across_processes_and_freed_by_a_kill(tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    assert (run_dir / LOCK_FILE).read_text().strip() == str(proc.pid)
    with pytest.raises(RunLockedError, match=rf"in use by another gnc process \(PID "
                       rf"{proc.pid}\); wait for it or use another --out"):
        with run_lock(run_dir):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with run_lock(run_dir):  # the OS released it with the process
        assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not holds_results(run_dir)  # .lock alone is no result


def test_train_evaluate_and_measure_refuse_a_locked_directory(tmp_path, capsys, holder):
    run_dir = tmp_path / "run"
    tiny_run(run_dir, capsys, "--checkpoint-every", "1")
    before = snapshot(run_dir)
    proc = holder(run_dir)
    for argv in (["train", "--preset", "ufm10", "--epochs", "3", *TINY_UFM, "--device", "cpu",
                  "--out", run_dir, "--resume"],
                 ["train", "--preset", "ufm10", "--epochs", "3", *TINY_UFM, "--device", "cpu",
                  "--out", run_dir, "--overwrite"],
                 ["evaluate", run_dir, "--all", "--device", "cpu"]):
        code, err = run_main(argv, capsys)
        assert code == 2
        assert_one_line_error(code, err, f"is in use by another gnc process (PID {proc.pid})")
    assert snapshot(run_dir) == before
    measured = tmp_path / "measured"
    holder(measured)
    code, err = run_main(["measure", "--model", f"run:{run_dir}", "--device", "cpu",
                          "--out", measured], capsys)
    assert code == 2
    assert_one_line_error(code, err, "is in use by another gnc process")
    assert snapshot(measured) == {}


def test_a_second_gnc_train_into_the_same_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "gnc", "train", "--preset", "ufm10", "--epochs", "100000",
            *TINY_UFM, "--device", "cpu", "--eval-every", "100000", "--out", str(run_dir)]
    first = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():  # written under the lock
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines == [f"gnc: error: {run_dir} is in use by another gnc process (PID "
                         f"{first.pid}); wait for it or use another --out"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with run_lock(run_dir):  # free once the first is killed
        pass


def test_a_trainer_releases_its_lock(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tiny_run(run_dir, capsys)
    code = "import sys\nfrom gnc.rundir import run_lock\nwith run_lock(sys.argv[1]): pass\n"
    subprocess.run([sys.executable, "-c", code, str(run_dir)], env=ENV, check=True)
    with pytest.raises(ValueError, match="already holds a run"):  # an error in __init__ ...
        Trainer(TrainConfig(epochs=1, progress=False), run_dir)
    subprocess.run([sys.executable, "-c", code, str(run_dir)], env=ENV, check=True)  # ... too


# --------------------------------------------------------------------------- B: fewer epochs


def test_resume_with_fewer_epochs_is_refused_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tiny_run(run_dir, capsys)
    before = snapshot(run_dir)
    code, err = run_main(["train", "--preset", "ufm10", "--epochs", "1", *TINY_UFM,
                          "--device", "cpu", "--out", run_dir, "--resume"], capsys)
    assert_one_line_error(code, err, f"{run_dir} has trained 2 epochs; --epochs 1 is fewer")
    assert code == 2 and snapshot(run_dir) == before


# --------------------------------------------------------------------------- C: no overwrite


def test_measure_and_train_refuse_to_replace_a_users_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tiny_run(run_dir, capsys)
    measure = ["measure", "--model", f"run:{run_dir}", "--device", "cpu", "--out"]
    single = tmp_path / "mine.json"
    single.write_text("my notes\n")
    assert_one_line_error(*run_main([*measure, single], capsys), "mine.json exists")
    assert single.read_text() == "my notes\n"
    assert run_main([*measure, single, "--overwrite"], capsys)[0] == 0
    assert "nc1" in json.loads(single.read_text())
    for name in ("config.json", "DONE"):
        folder = tmp_path / f"mine-{name.partition('.')[0]}"
        folder.mkdir()
        (folder / name).write_text('{"mine": 1}\n')
        code, err = run_main([*measure, folder], capsys)
        assert code == 2
        assert_one_line_error(code, err, f"{folder / name} exists")
        assert snapshot(folder) == {name: b'{"mine": 1}\n'}
    # a lone config.json of yours is a result; a gnc run's that never evaluated is not
    folder = tmp_path / "mine-train"
    folder.mkdir()
    (folder / "config.json").write_text('{"lr": 0.5}\n')
    code, err = run_main(["train", "--preset", "ufm10", "--epochs", "1", *TINY_UFM,
                          "--device", "cpu", "--out", folder], capsys)
    assert_one_line_error(code, err, "already holds a run")
    assert snapshot(folder) == {"config.json": b'{"lr": 0.5}\n'}
    assert holds_results(folder)
    (folder / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    assert not holds_results(folder)


# --------------------------------------------------------------------------- D: npz files


def _forged_npz(path: Path) -> None:
    """A few hundred bytes whose `x` header declares 8·10¹² float64."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (8 * 10**12,)})
    labels = io.BytesIO()
    np.save(labels, np.arange(4) % 2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue() + bytes(64))
        z.writestr("y.npy", labels.getvalue())


def _npz_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    x, y = np.random.default_rng(0).normal(size=(8, 3)), np.arange(8) % 2
    cases = {}

    def save(stem: str, match: str, **arrays) -> None:
        np.savez(tmp_path / f"{stem}.npz", **arrays)
        cases[stem] = (tmp_path / f"{stem}.npz", match)

    (tmp_path / "empty.npz").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.npz", "empty: 0 bytes")
    np.save(tmp_path / "renamed.npy", x)
    os.replace(tmp_path / "renamed.npy", tmp_path / "renamed.npz")
    cases["renamed"] = (tmp_path / "renamed.npz", "not a zip file; a .npy array renamed")
    _forged_npz(tmp_path / "forged.npz")
    assert (tmp_path / "forged.npz").stat().st_size < 1000
    cases["forged"] = (tmp_path / "forged.npz", "declares shape .8000000000000,. of float64")
    for kind in ("timedelta64[s]", "datetime64[s]", "complex128"):
        save(f"y-{kind[:4]}", "Expected `y` to be a 1-D integer array", x=x, y=y.astype(kind))
    save("y-object", "Object arrays cannot be loaded", x=x, y=y.astype(object))
    save("x-timedelta", "Expected `x` to be a real numeric array", x=x.astype("m8[s]"), y=y)
    save("x_test-empty", "`x_test` has no rows", x=x, y=y, x_test=x[:0], y_test=y[:0])
    save("x-no-features", r"at least one feature axis \(none empty\), but got shape \(8, 0\)",
         x=x[:, :0], y=y)
    save("x-beyond-float32", "`x` holds values beyond float32's range", x=x * 1e300, y=y)
    save("x_test-beyond-float32", "`x_test` holds values beyond float32's range", x=x, y=y,
         x_test=-x * 1e300, y_test=y)
    return cases


def test_bad_npz_files_are_one_line_naming_the_file(tmp_path):
    for stem, (path, match) in _npz_cases(tmp_path).items():
        with pytest.raises(ValueError, match=match) as err:
            load_dataset(f"npz:{path}")
        assert str(path) in str(err.value) and "\n" not in str(err.value), stem


@pytest.mark.parametrize("stem", ["forged", "x_test-empty", "y-time"])
def test_bad_npz_fails_before_the_run_directory(tmp_path, capsys, stem):
    path, match = _npz_cases(tmp_path)[stem]
    out = tmp_path / "run"
    code, err = run_main(["train", "--dataset", f"npz:{path}", "--model", "mlp", "--epochs",
                          "1", "--no-progress", "--device", "cpu", "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- E: images


def _image_tree(root: Path, bad: str | None = None) -> Path | None:
    """``root/{train,test}/{a,b}/*.png`` of 8x8 images; ``bad`` adds one offending file."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")
    target = root / "train" / "b" / "z.jpg"
    if bad == "fifo":  # opening it waited for a writer forever (Ctrl-C could not end it)
        os.mkfifo(target)
    elif bad == "loop":  # ImageFolder follows it: b's images again as a's, silently
        target = root / "train" / "a" / "up"
        target.symlink_to("..")
    elif bad == "text":
        target.write_text("not an image")
    elif bad == "empty":
        target.write_bytes(b"")
    elif bad == "size":
        Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(target)
    else:
        return None
    return target


@pytest.mark.parametrize("bad,match", [("text", "is not a readable image"),
                                       ("empty", "is not a readable image"),
                                       ("fifo", "is not a regular file"),
                                       ("loop", "is a symbolic link to .*, a folder above it"),
                                       ("size", "is 8x9 pixels, but the dataset's images are "
                                        "8x8")])
def test_bad_images_fail_before_the_run_directory(tmp_path, bad, match):
    target = _image_tree(tmp_path / "imgs", bad)
    cfg = TrainConfig(dataset=f"imagefolder:{tmp_path / 'imgs'}", model="mlp", width=8,
                      epochs=1, batch_size=4, progress=False, device="cpu",
                      data_on_device="off")
    with pytest.raises(ValueError, match=match) as err:
        Trainer(cfg, tmp_path / "run")
    assert str(target) in str(err.value)
    assert not (tmp_path / "run").exists()
    if bad == "fifo":  # the device path reads every file too
        with pytest.raises(ImageDecodeError, match=match):
            Trainer(dataclasses.replace(cfg, data_on_device="on"), tmp_path / "run")
        assert not (tmp_path / "run").exists()
    # CIFAR-10's JPEG folders are read by the same code
    data_dir = tmp_path / "data"
    for split in ("train", "test"):
        for k in range(10):
            (data_dir / "cifar10-jpg" / split / f"c{k}").mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(
                data_dir / "cifar10-jpg" / split / f"c{k}" / "0.png")
    (data_dir / "cifar10-jpg" / "test" / "c3" / "1.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="c3/1.jpg is not a readable image"):
        load_dataset("cifar10", data_dir=data_dir)


def _mnist_files(root: Path, damage: str) -> None:
    """MNIST's four idx files of 20 images each under ``root/mnist/MNIST/raw``, damaged."""
    import struct

    def idx(dims, payload=b"", kind=8):
        return struct.pack(">BBBB", 0, 0, kind, len(dims)) + b"".join(
            struct.pack(">I", d) for d in dims) + payload

    rng = np.random.default_rng(0)
    n, raw = 20, root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = (np.arange(n) % 10).astype(np.uint8)
    files = {}
    for prefix in ("train", "t10k"):
        files[f"{prefix}-images-idx3-ubyte"] = idx(
            [n, 28, 28], rng.integers(0, 255, n * 784, dtype=np.uint8).tobytes())
        files[f"{prefix}-labels-idx1-ubyte"] = idx([n], labels.tobytes())
    if damage == "junk":
        files = dict.fromkeys(files, b"hello world junk")
    elif damage == "labels":
        files["train-labels-idx1-ubyte"] = idx([n], np.full(n, 200, np.uint8).tobytes())
    elif damage == "fewer labels":
        files["train-labels-idx1-ubyte"] = idx([12], labels[:12].tobytes())
    for name, data in files.items():
        (raw / name).write_bytes(data)


@pytest.mark.parametrize("damage,match", [
    ("junk", "missing or corrupted"), ("labels", r"labels in \[200, 200\], not in \[0, 10\)"),
    ("fewer labels", "20 images but 12 labels")])
def test_damaged_mnist_files_are_one_line_before_the_run_directory(tmp_path, damage, match):
    """torchvision checks only that MNIST's files exist: junk was an AssertionError traceback,
    a label of 200 an index error in the first step (after the run directory was made),
    fewer labels than images an IndexError or, on the device path, fewer samples silently."""
    _mnist_files(tmp_path / "data", damage)
    with pytest.raises(OSError, match=match):  # DatasetNotFoundError: one line in the CLI
        load_dataset("mnist", data_dir=tmp_path / "data")


def test_a_truncated_jpeg_names_itself_when_read(tmp_path):
    """Cut short after an intact header, it passes the header check (no pixels read) and
    failed at its first read on the PIL path as "image file is truncated", naming nothing.
    (Finding it before the run directory would mean decoding every image up front, which
    the device path does.)"""
    _image_tree(tmp_path / "imgs")
    jpg = tmp_path / "imgs" / "train" / "a" / "t.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (8, 8, 3), np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:-40])
    bundle = load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    index = [p for p, _ in bundle.train.samples].index(str(jpg))
    with pytest.raises(ImageDecodeError, match=f"{jpg} is not a readable image .*truncated"):
        bundle.train[index]


def test_a_one_class_image_folder_fails_before_the_run_directory(tmp_path):
    """--method standard took it and failed at the first evaluation (the NC metrics need two
    classes), after the run directory was made."""
    _image_tree(tmp_path / "imgs")
    for split in ("train", "test"):
        for f in (tmp_path / "imgs" / split / "b").iterdir():
            f.unlink()
        (tmp_path / "imgs" / split / "b").rmdir()
    cfg = TrainConfig(dataset=f"imagefolder:{tmp_path / 'imgs'}", model="mlp", width=8,
                      epochs=1, batch_size=2, progress=False, device="cpu", method="standard")
    with pytest.raises(ValueError, match="has 1 class: a classifier needs 2 or more"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_image_tree_without_a_test_split_says_so(tmp_path, caplog):
    _image_tree(tmp_path / "imgs")
    for f in (tmp_path / "imgs" / "test").rglob("*.png"):
        f.unlink()
    for d in (tmp_path / "imgs" / "test").iterdir():
        d.rmdir()
    (tmp_path / "imgs" / "test").rmdir()
    bundle = load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    assert bundle.test is None
    assert "no test split" in caplog.text and "no test metrics" in caplog.text


@pytest.mark.parametrize("field,value,match", [
    ("device", "meta", "`device` to be auto, cpu, cuda or cuda:N"),
    ("lr", 1e308, r"`lr` <= 1e\+06"),
    ("momentum", 5.0, r"`momentum` in \[0, 1\)"),
    ("momentum", 1, r"`momentum` in \[0, 1\)"),
])
def test_settings_no_run_can_use_fail_at_validation(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        Trainer(TrainConfig(**{field: value, "progress": False}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- F: types


WRONG_TYPES = [
    ("epochs", 2.0, "int"), ("epochs", True, "int"), ("epochs", "3", "int"),
    ("epochs", None, "int"), ("width", [1], "int"), ("seed", 1.5, "int"),
    ("lr", "abc", "float"), ("lr", True, "float"), ("tau", None, "float"),
    ("dataset_options", [1], "dict"), ("dataset_options", {1: 2}, "dict"),
    ("dataset_options", "x", "dict"), ("milestones", [1.5], r"list\[int\] \| None"),
    ("milestones", 3, r"list\[int\] \| None"), ("feature_dim", "8", r"int \| None"),
    ("small_input", 1, r"bool \| None"), ("bias", 0, "bool"), ("eval_test", "yes", "bool"),
    ("dataset", 3, "str"), ("device", None, "str"), ("method", ["implicit"], "str"),
]


@pytest.mark.parametrize("field,value,kind", WRONG_TYPES)
def test_every_field_is_type_checked(field, value, kind):
    match = rf"Expected `{field}` to be {kind}, but got "
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({field: value})


def test_right_types_pass():
    TrainConfig(lr=1, tau=2, milestones=[1, 2], feature_dim=None, small_input=None,
                dataset_options={"subset": 5}).validate()


@pytest.mark.parametrize("key", ["augment", "seed", "data_dir", "download", "imbalance",
                                 "label_noise"])
def test_dataset_options_that_are_settings_of_their_own_are_one_line(tmp_path, capsys, key):
    """They reached load_dataset twice (a TypeError's traceback); now refused, naming the
    flag, before anything is written."""
    value = {"data_dir": '"x"', "imbalance": "0.5", "label_noise": "0.1"}.get(key, "true")
    code, err = run_main(["train", "--dataset", "digits", "--dataset-options",
                          f'{{"{key}": {value}, "subset": 5}}', "--epochs", "1",
                          "--out", tmp_path / "run"], capsys)
    flag = "--" + key.replace("_", "-")
    assert_one_line_error(code, err, f"dataset option(s) '{key}' are settings of their own: "
                                     f"use {flag}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,match", [
    (["--preset", "ufm10", "--dataset-options", '{"num_classes": 3, "per_class": 2.5}'],
     "dataset 'ufm': option 'per_class' must be an integer >= 1, but got 2.5"),
    (["--preset", "ufm10", "--dataset-options", '{"num_classes": "3"}'],
     "option 'num_classes' must be an integer >= 2, but got '3'"),
    (["--preset", "ufm10", "--dataset-options", '{"subset": [1]}'],
     "option 'subset' must be an integer >= 1, but got [1]"),
    (["--preset", "mnist1d", "--dataset-options", '{"num_samples": 50, "train_split": 1.0}'],
     "option 'train_split' must be a number in (0, 1), but got 1.0"),
    (["--preset", "mnist1d", "--dataset-options", '{"num_samples": 50, "train_split": 0.01}'],
     "mnist1d: num_samples=50 with train_split=0.01 leaves 0 training and 50 test samples"),
    (["--dataset", "digits", "--dataset-options", '{"test_fraction": 0.999}'],
     "digits: test_fraction=0.999 puts 1796 of its 1797 images in the test split"),
    (["--dataset", "imagefolder:x", "--dataset-options", '{"mean": [0.5, 0.5]}'],
     "option 'mean' must be null or a list of 3 finite numbers (R, G, B), but got [0.5, 0.5]"),
    (["--dataset", "imagefolder:x", "--dataset-options", '{"std": [1, 0, 1]}'],
     "option 'std' must be null or a list of 3 positive finite numbers"),
    (["--dataset", "imagefolder:x", "--dataset-options", '{"image_size": "8"}'],
     "option 'image_size' must be null or an integer in [1, 4096], but got '8'"),
])
def test_dataset_option_values_are_checked_before_anything(tmp_path, capsys, flags, match):
    """Values of the wrong type or range were tracebacks deep in a loader, some after the
    run directory existed (a float per_class failed in the first step)."""
    code, err = run_main(["train", *flags, "--epochs", "1", "--feature-dim", "6",
                          "--no-progress", "--device", "cpu", "--out", tmp_path / "run"],
                         capsys)
    assert_one_line_error(code, err, match)
    assert not (tmp_path / "run").exists()


def test_evaluate_all_refuses_an_out_that_is_the_runs_own_file(tmp_path, capsys):
    """`--out RUN/config.json` appended metrics lines to the run's config (the next command
    failed on it), `--out RUN/checkpoints/last.pt` to its checkpoint; a folder or a missing
    one were bare errno messages. A new *.jsonl in the run, or a file elsewhere, is fine."""
    run_dir = tmp_path / "run"
    tiny_run(run_dir, capsys)
    before = snapshot(run_dir)
    for out, match in ((run_dir / "config.json", "is a file of the run"),
                       (run_dir / "metrics.jsonl", "is a file of the run"),
                       (run_dir / "checkpoints" / "last.pt", "is a file of the run"),
                       (run_dir / "checkpoints" / "x.jsonl", "is a file of the run"),
                       (run_dir, "is a folder; name the metrics file"),
                       (tmp_path / "nowhere" / "x.jsonl", "does not exist")):
        code, err = run_main(["evaluate", run_dir, "--all", "--device", "cpu", "--out", out],
                             capsys)
        assert_one_line_error(code, err, match)
    assert snapshot(run_dir) == before
    for out in (run_dir / "evaluate_again.jsonl", tmp_path / "elsewhere.jsonl"):
        code, err = run_main(["evaluate", run_dir, "--all", "--device", "cpu", "--out", out],
                             capsys)
        assert code == 0, err
        assert out.read_text().count("\n") == 1  # the one kept checkpoint


def test_a_config_json_of_wrong_types_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tiny_run(run_dir, capsys)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "dataset_options": [1]}))
    for argv in (["evaluate", run_dir, "--device", "cpu"],
                 ["measure", "--model", f"run:{run_dir}", "--device", "cpu"]):
        code, err = run_main(argv, capsys)
        assert code == 2
        assert_one_line_error(code, err, "Expected `dataset_options` to be dict, but got [1]")


@pytest.mark.parametrize("item,match", [
    ("lr=abc", "invalid JSON 'abc'"), ("dataset_options={bad", "invalid JSON '{bad'"),
    ("dataset_options=[1,2]", "Expected `dataset_options` to be dict"),
    ("epochs=null", "Expected `epochs` to be int"),
])
def test_bench_set_values_are_one_line(capsys, item, match):
    code, err = run_main(["bench", "--sizes", "none", "--steps", "none", "--set", item],
                         capsys)
    assert code == 2
    assert_one_line_error(code, err, match)


# --------------------------------------------------------------------------- G: Ctrl-C


@pytest.mark.parametrize(("argv", "trains"), [
    (["train", "--preset", "ufm10", "--out", "x"], True),
    (["experiment", "ufm10", "--out", "x"], True),
    (["experiment", "ufm10", "--out", "x", "--jobs", "2"], False),  # its workers train
    (["experiment", "ufm10", "--out", "x", "--jobs", "2", "--jobs-mode", "streams"], True),
    (["bench"], True),
    (["report", "x"], False),
    (["evaluate", "x"], False),
])
def test_commands_that_train_import_dynamo_while_ctrl_c_exits_at_once(argv, trains):
    """torch._dynamo (which the first optimiser step imports: 1 s, ~900 modules) is imported
    in the start-up window by the commands that train in the process: a Ctrl-C inside that
    import was sometimes swallowed (torch's optional-import guards catch what it became) and
    the run went on."""
    from gnc import cli

    modules = cli._command_modules(cli.build_parser().parse_args(argv))
    assert ("torch._dynamo" in modules) == trains
    assert modules[0].startswith("gnc.")


def _ctrl_c_as_at_a_terminal() -> None:
    """In the child: SIGINT's default action, also when the suite runs where it is ignored
    (a background job of a non-interactive shell), which the child would inherit and gnc
    rightly leave alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fork_server_of(pid: int) -> int | None:
    """The pid of a child of ``pid`` running multiprocessing's fork server, or None."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"forkserver" in cmdline:
            return int(stat.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_ctrl_c_while_the_fork_server_imports_is_one_line(tmp_path):
    """``gnc experiment --jobs 2``: the workers' fork server starts while the command line is
    parsed and imports torch for a few seconds. A Ctrl-C to the process group then (the
    terminal signals every process in it) printed the server's KeyboardInterrupt traceback
    beside "gnc: interrupted"; it now starts with SIGINT ignored."""
    argv = [sys.executable, "-m", "gnc", "experiment", "ufm10", "--seeds", "2", "--jobs", "2",
            "--epochs", "100000", *TINY_UFM, "--device", "cpu", "--out", str(tmp_path / "x")]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_ctrl_c_as_at_a_terminal,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    server = None
    while server is None and time.monotonic() < deadline and proc.poll() is None:
        server = _fork_server_of(proc.pid)
        time.sleep(0.01)
    assert server is not None, "no fork server started"
    time.sleep(0.3)  # inside its imports (torch takes seconds here)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    last = err.strip().splitlines()[-1]  # (with the resume hint once the command runs)
    assert "Traceback" not in err and last.startswith("gnc: interrupted"), err


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """SIGINT while ``python -m gnc train`` imports torch: "gnc: interrupted", exit 130, no
    traceback. Before gnc's code runs (the interpreter starting, runpy importing the package:
    the first tens of milliseconds) Python's own handling applies — death by SIGINT, or its
    KeyboardInterrupt traceback without a gnc frame: such a try is not counted, and repeated
    at another delay."""
    argv = [sys.executable, "-m", "gnc", "train", "--preset", "ufm10", "--epochs", "100000",
            *TINY_UFM, "--device", "cpu", "--out", str(tmp_path / "run")]
    interrupted = []
    for delay in (0.3, 0.6, 1.0, 1.5, 2.5, 0.8, 2.0, 4.0):
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_ctrl_c_as_at_a_terminal)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "gnc/cli.py" not in err and "gnc/__main__.py" not in err, (delay, err)
        if proc.returncode == 130:
            assert err.strip().splitlines() in (
                ["gnc: interrupted"],  # at start-up, or training: how to go on
                [f"gnc: interrupted (gnc train --out {tmp_path / 'run'} --resume continues "
                 "from its last checkpoint)"]), (delay, err)
            interrupted.append(delay)
        else:  # before gnc's code ran
            assert proc.returncode in (-signal.SIGINT, 1), (delay, proc.returncode, err)
        if len(interrupted) >= 4:
            break
    assert len(interrupted) >= 2, interrupted


def test_ctrl_c_after_the_command_has_finished_is_no_error(tmp_path):
    """A Ctrl-C in the seconds of the interpreter's teardown after a finished `gnc train`
    gave a KeyboardInterrupt traceback from torch's finalizers (exit 0) or a death by SIGINT:
    once the command has finished, SIGINT is ignored. Here the SIGINT comes right after
    main() returns, as the program's own `gnc` would."""
    code = ("import os, signal, sys, time; from gnc.cli import main; "
            "sys.argv = ['gnc', 'presets']; main(); "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5); print('after')")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                          text=True, preexec_fn=_ctrl_c_as_at_a_terminal, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == "after"


FIFO_CHECKS = """
import os, sys
from pathlib import Path
from gnc.measure import _is_measure_config
from gnc.rundir import holds_results, read_margins, read_metrics

root = Path(sys.argv[1])
for name in ("metrics.jsonl", "config.json", "evaluate_train.jsonl"):
    run = root / name.replace(".", "_")
    run.mkdir()
    os.mkfifo(run / name)
    print(name, holds_results(run))
run = root / "margins"
run.mkdir()
os.mkfifo(run / "cos_margins.npy")
os.mkfifo(run / "metrics.jsonl")
print("margins", read_margins(run), read_metrics(run / "metrics.jsonl"))
print("measure", _is_measure_config(root / "config_json" / "config.json"))
"""


def test_fifos_in_a_run_directory_are_never_read(tmp_path):
    """A FIFO where a run's file should be blocked its reader forever (a fresh `gnc train`
    checking the directory, `gnc report` reading the margins): now it is no result file."""
    done = subprocess.run([sys.executable, "-c", FIFO_CHECKS, str(tmp_path)], timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:5] == [
        "metrics.jsonl True", "config.json True", "evaluate_train.jsonl True",
        "margins None []", "measure False"]


def test_read_metrics_skips_lines_that_are_not_utf8(tmp_path, caplog):
    import logging

    from gnc.rundir import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 1, "nc1": 0.5}\n{"epoch": 2, "note": "\xff\xfe"}\n'
                     b'{"epoch": 3, "note": "\xe2\x80\xa8 ok"}\n')
    with caplog.at_level(logging.WARNING, logger="gnc.rundir"):
        rows = read_metrics(path)
    assert [r["epoch"] for r in rows] == [1, 3]  # U+2028 inside a string splits no line
    assert "metrics.jsonl:2: not UTF-8" in caplog.text


# --------------------------------------------------------------------------- write faults


def _enospc(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_lock_names_the_lock_and_leaves_it_free(tmp_path, monkeypatch):
    """Writing the holder's PID into ``.lock`` on a full disk was a bare "[Errno 28]" (no
    file named; the buffered write failed again in close()) and kept the locked file open
    until the traceback was collected. The disk is full at the system call, as a real one."""
    import gnc.rundir as rundir

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(rundir.os, "pwrite", _enospc)
        with pytest.raises(OSError, match=r"no space left on the device writing .*run/\.lock"):
            rundir.RunLock(run).acquire()
    with run_lock(run) as lock:  # free again: its file was closed
        assert lock.held


def test_a_failed_append_is_cut_off_and_a_torn_line_stays_its_own(tmp_path, monkeypatch, caplog):
    """A full disk mid-append left a torn row; the next append (after space was freed) was
    glued onto it and both rows were lost to a command that reported success."""
    import logging

    import gnc.rundir as rundir
    from gnc.rundir import append_line, read_metrics

    path = tmp_path / "evaluate_train.jsonl"
    append_line(path, json.dumps({"epoch": 1}))
    real_write = rundir.os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        _enospc()

    with monkeypatch.context() as m:
        m.setattr(rundir.os, "write", half_then_full)
        with pytest.raises(OSError, match="no space left on the device writing"):
            append_line(path, json.dumps({"epoch": 2, "nc1": 0.25}))
    assert path.read_text() == '{"epoch": 1}\n'  # cut off again
    append_line(path, json.dumps({"epoch": 2}))
    # a writer killed mid-line leaves no newline: the next row still starts a line of its own
    with open(path, "a") as f:
        f.write('{"epoch": 3, "nc')
    append_line(path, json.dumps({"epoch": 4}))
    with caplog.at_level(logging.WARNING, logger="gnc.rundir"):
        assert [r["epoch"] for r in read_metrics(path)] == [1, 2, 4]
    assert "line skipped" in caplog.text


def _files_read_only(monkeypatch) -> None:
    """Every open of a run's file for writing fails as on a folder this user may not write
    (as root, permission bits do not stop writes)."""
    import errno

    import gnc.rundir as rundir

    real_open = rundir._open_in_run

    def read_only(path, flags):
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags)

    monkeypatch.setattr(rundir, "_open_in_run", read_only)


def test_a_read_only_experiment_is_reported_elsewhere(tmp_path, monkeypatch, caplog):
    """`gnc report EXP --out ELSEWHERE` only reads EXP, but needed to open EXP/.lock for
    writing: an archived or shared (read-only) experiment could not be reported at all."""
    import logging

    from gnc.experiments import run_experiment
    from gnc.report import make_report

    exp = tmp_path / "exp"
    run_experiment("ufm10", exp, seeds=1, methods=["fixed"], report=False,
                   overrides={"epochs": 2, "eval_every": 1, "progress": False, "feature_dim": 8,
                              "dataset_options": {"num_classes": 3, "per_class": 4}})
    _files_read_only(monkeypatch)
    (exp / ".lock").write_text("")
    make_report(exp, out_dir=tmp_path / "a")  # locked through .lock opened for reading
    assert (tmp_path / "a" / "report.md").is_file()
    (exp / ".lock").unlink()
    with caplog.at_level(logging.WARNING, logger="gnc.rundir"):
        make_report(exp, out_dir=tmp_path / "b")  # no .lock, none can be made: unlocked
    assert "cannot be locked" in caplog.text and (tmp_path / "b" / "report.md").is_file()
    with pytest.raises(PermissionError, match=r"permission denied writing .*\.lock"):
        make_report(exp)  # into the experiment itself: a writer, refused in one line


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path, capsys):
    """A run that failed before its first checkpoint was refused both ways ("already holds
    a run" without --resume, "no checkpoint" with it): the second now names --overwrite."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig(method="fixed", seed=1).to_dict()))
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    code, err = run_main(["train", "--out", run, "--resume", *TINY_UFM], capsys)
    assert_one_line_error(code, err, "stopped before its first checkpoint")
    assert "start it again with --overwrite" in err
    code, err = run_main(["train", "--out", tmp_path / "new", "--resume", *TINY_UFM], capsys)
    assert_one_line_error(code, err, "no run has trained there: leave out --resume")
    (run / "config.json").write_text('{"lr": 3, "mine": true}')  # not gnc's: never replace it
    code, err = run_main(["train", "--out", run, "--resume", *TINY_UFM], capsys)
    assert_one_line_error(code, err, "no checkpoint at")
    assert "--overwrite" not in err


def test_readers_of_a_read_only_experiment_share_its_lock_and_writers_wait(tmp_path,
                                                                            monkeypatch):

    from gnc.rundir import RunLock

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / ".lock").write_text("")
    _files_read_only(monkeypatch)
    first = RunLock(exp).acquire(create=False, reader=True)
    assert first.held
    # another process: a reader goes along (shared), a writer is refused while it is held
    probe = ("import fcntl, os, sys\n"
             "f = os.open(sys.argv[1], os.O_RDONLY)\n"
             "for mode in (fcntl.LOCK_SH, fcntl.LOCK_EX):\n"
             "    try:\n"
             "        fcntl.flock(f, mode | fcntl.LOCK_NB); fcntl.flock(f, fcntl.LOCK_UN)\n"
             "        print('took')\n"
             "    except BlockingIOError:\n"
             "        print('busy')\n")
    done = subprocess.run([sys.executable, "-c", probe, str(exp / ".lock")],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["took", "busy"], done.stderr
    first.release()


def test_a_batch_of_one_with_batchnorm_is_refused_before_the_run_directory(tmp_path, capsys):
    out = tmp_path / "b1"
    argv = ["train", "--dataset", "digits", "--model", "mlp", "--method", "standard",
            "--epochs", "1", "--out", out, "--no-progress"]
    code, err = run_main(argv + ["--batch-size", "1", "--sampler", "shuffle"], capsys)
    assert_one_line_error(code, err, "one sample per process (--batch-size 1)")
    assert not out.exists()
    # stratified batches of 15 hold one sample of each of the 10 classes: 10, which is fine
    code, err = run_main(argv + ["--batch-size", "15", "--width", "8"], capsys)
    assert code == 0, err
