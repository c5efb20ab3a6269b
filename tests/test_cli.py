import json
import subprocess
import sys

import numpy as np

from gnc.cli import build_parser, train_config_from_args


def gnc(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "gnc", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    np.savez(tmp_path / "bad.npz", features=np.zeros((4, 2)), labels=np.zeros(4))
    out = str(tmp_path / "run")
    cases = {
        "unknown preset": (["train", "--preset", "cifar1000", "--out", out], "unknown preset"),
        "unknown method": (["train", "--preset", "ufm10", "--method", "learned", "--out", out],
                           "unknown method"),
        "unknown dataset": (["train", "--dataset", "mnist2d", "--out", out], "unknown dataset"),
        "unknown backbone": (["train", "--dataset", "digits", "--model", "resnet9",
                              "--out", out], "unknown backbone"),
        "missing data": (["train", "--dataset", "cifar10", "--model", "resnet18", "--data-dir",
                          str(tmp_path / "nowhere"), "--out", out], "--download"),
        "npz without x/y": (["train", "--dataset", f"npz:{tmp_path / 'bad.npz'}", "--model",
                             "mlp", "--out", out], "'x' and 'y'"),
        "batch < K": (["train", "--preset", "digits", "--batch-size", "8", "--out", out],
                      "smaller than the number of classes"),
        "unknown experiment preset": (["experiment", "nope", "--out", out], "unknown preset"),
        "not a run dir": (["evaluate", str(tmp_path)], "not a run directory"),
    }
    procs = {name: gnc(*args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0, name
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gnc: error:"), (name, stderr)
        assert cases[name][1] in lines[0], (name, lines[0])


def test_presets_listed_one_line_each():
    out = subprocess.run([sys.executable, "-m", "gnc", "presets"], capture_output=True,
                         text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("ufm10 ") for line in lines)
    assert any(line.startswith("digits ") for line in lines)


def test_explicit_flags_override_the_preset():
    args = build_parser().parse_args(["train", "--preset", "ufm10", "--out", "x", "--lr",
                                      "0.3", "--num-classes", "4", "--seed", "7"])
    cfg = train_config_from_args(args)
    assert cfg.lr == 0.3 and cfg.seed == 7 and cfg.epochs == 2000
    assert cfg.dataset_options == {"num_classes": 4, "per_class": 100}
    args = build_parser().parse_args(["train", "--preset", "ufm10", "--dataset", "digits",
                                      "--model", "mlp", "--out", "x"])
    assert train_config_from_args(args).dataset_options == {}


def test_train_help_fits_a_screen():
    out = subprocess.run([sys.executable, "-m", "gnc", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert len(out.splitlines()) <= 80
    assert "--resume" in out and "--method" in out


def test_train_then_evaluate_through_the_cli(tmp_path):
    entry = ["-m", "gnc"]
    run = tmp_path / "run"
    subprocess.run([sys.executable, *entry, "train", "--preset", "ufm10", "--epochs", "20",
                    "--num-classes", "4", "--per-class", "5", "--feature-dim", "8",
                    "--eval-every", "10", "--out", str(run), "--no-progress"],
                   check=True, capture_output=True)
    out = subprocess.run([sys.executable, *entry, "evaluate", str(run)], check=True,
                         capture_output=True, text=True).stdout
    metrics = json.loads(out)
    assert metrics["epoch"] == 20 and "nc1" in metrics
