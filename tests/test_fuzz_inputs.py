"""Fuzzing the command line: random bad npz files and random flag values (seeded, bounded).

Whatever the input, ``gnc.cli.main`` either succeeds or exits non-zero with one line on
stderr — never a traceback — and the run directories it leaves never break ``gnc report``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from test_cli import run_main

NPZ_TRIALS = 30
FLAG_TRIALS = 40


def assert_clean_exit(code: int, err: str, argv: list) -> None:
    assert "Traceback" not in err, (argv, err)
    if code != 0:
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert isinstance(code, int) and len(errors) == 1, (argv, err)
        assert errors[0].startswith("gnc"), (argv, err)


# --------------------------------------------------------------------------- npz files


def _valid(rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, k, width = int(rng.integers(6, 16)), int(rng.integers(2, 4)), int(rng.integers(1, 5))
    y = np.arange(n) % k
    return {"x": rng.normal(size=(n, width)), "y": y, "x_test": rng.normal(size=(4, width)),
            "y_test": y[:4]}


def _mutate(a: dict, rng: np.random.Generator) -> dict:
    x, y = a["x"], a["y"]
    choices = {
        "x 1-D": lambda: {**a, "x": x[:, 0]},
        "x 0-d": lambda: {**a, "x": np.float64(1.0)},
        "y 2-D": lambda: {**a, "y": y[:, None]},
        "x NaN": lambda: {**a, "x": np.where(rng.random(x.shape) < 0.2, np.nan, x)},
        "x inf": lambda: {**a, "x": np.full_like(x, np.inf)},
        "x_test NaN": lambda: {**a, "x_test": np.full_like(a["x_test"], np.nan)},
        "y float": lambda: {**a, "y": y.astype(float) + 0.5},
        "y negative": lambda: {**a, "y": y - 1},
        "y huge": lambda: {**a, "y": np.where(y == 0, 10**9, y)},
        "y int64 max": lambda: {**a, "y": np.where(y == 0, 2**63 - 1, y)},
        "y uint64 huge": lambda: {**a, "y": np.where(y == 0, 2**64 - 1, y).astype(np.uint64)},
        "y gap": lambda: {**a, "y": 2 * y},
        "one class": lambda: {**a, "y": np.zeros_like(y)},
        "lengths": lambda: {**a, "y": y[:-1]},
        "test lengths": lambda: {**a, "y_test": a["y_test"][:-1]},
        "test width": lambda: {**a, "x_test": rng.normal(size=(4, x.shape[1] + 1))},
        "test label unseen": lambda: {**a, "y_test": a["y_test"] + 10},
        "no x": lambda: {k: v for k, v in a.items() if k != "x"},
        "no y_test": lambda: {k: v for k, v in a.items() if k != "y_test"},
        "empty": lambda: {**a, "x": x[:0], "y": y[:0]},
        "x strings": lambda: {**a, "x": x.astype(str)},
        "x complex": lambda: {**a, "x": x + 1j},
        "x bool": lambda: {**a, "x": x > 0, "x_test": a["x_test"] > 0},
        "x int": lambda: {**a, "x": (10 * x).astype(np.int32),
                          "x_test": (10 * a["x_test"]).astype(np.int32)},
        "y uint8": lambda: {**a, "y": y.astype(np.uint8)},
        "test lacks a class": lambda: {**a, "y_test": np.zeros(4, dtype=int)},
        "valid": lambda: a,
    }
    names = list(choices)
    return choices[names[int(rng.integers(len(names)))]]()


def test_random_npz_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(2024)
    exp = tmp_path / "exp"
    outcomes = []
    for i in range(NPZ_TRIALS):
        path = tmp_path / f"data{i}.npz"
        np.savez(path, **_mutate(_valid(rng), rng))
        out = exp / "npz" / f"seed{i}"
        argv = ["train", "--dataset", f"npz:{path}", "--model", "mlp", "--width", "8",
                "--feature-dim", "8", "--epochs", "1", "--batch-size", "0", "--out", out,
                "--no-progress"]
        code, err = run_main(argv, capsys)
        assert_clean_exit(code, err, argv)
        if code == 0:
            (out / "DONE").write_text("finished\n")
        else:
            assert not out.exists(), (argv, err)  # bad data fails before the run directory
        outcomes.append(code)
    assert 0 in outcomes and any(outcomes)  # both kinds were drawn
    code, err = run_main(["report", exp, "--machine", "fuzz"], capsys)
    assert code == 0, err


# --------------------------------------------------------------------------- flag values

FLAG_VALUES = {
    "--lr": [math.nan, math.inf, -1, 0, 1e-3, 0.5, 1e8],
    "--delta": [-1, math.nan, math.inf, 0, 1e-3, 10],
    "--tau": [0, -1, math.nan, 1, 5],
    "--momentum": [-1, math.nan, 0, 0.9],
    "--weight-decay": [-1, math.inf, 0, 5e-4],
    "--checkpoint-every": [-1, 0, 1],
    "--eval-every": [-1, 0, 1, 3],
    "--batch-size": [-1, 0, 1, 3, 5, 6, 12, 100],
    "--seed": [-1, 0, 3, 2**32],
    "--epochs": [-1, 0, 1, 2],
    "--feature-dim": [0, 2, 6, 16],
    "--num-classes": [0, 1, 2, 3],
    "--per-class": [0, 1, 4],
    "--width": [0, 4],
    "--method": ["standard", "fixed", "implicit", "implicit-nograd", "nope"],
    "--solver": ["exact", "riemannian", "nope"],
    "--backward": ["closed_form", "ddn", "none", "nope"],
    "--optimizer": ["sgd", "adam", "adamw", "agd", "nope"],
    "--schedule": ["none", "cosine", "step", "multistep", "onecycle", "nope"],
    "--gamma": [-1, math.nan, 0, 0.5],
    "--step-every": [-1, 0, 1],
    "--loss": ["ce", "dr", "nope"],
    "--sampler": ["stratified", "shuffle", "nope"],
    "--imbalance": [-1, 0, math.nan, 0.01, 0.5, 1, 2],
    "--label-noise": [-0.1, math.nan, 0, 0.5, 1, 1.5],
    "--device": ["cpu", "bogus", "cuda:x"],
    "--subset": [0, 1, 2],
}
BASE = {"--preset": "ufm10", "--num-classes": 3, "--per-class": 4, "--feature-dim": 6,
        "--epochs": 1, "--eval-every": 1}


def test_random_flag_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(7)
    exp = tmp_path / "exp"
    outcomes = []
    flags = list(FLAG_VALUES)
    for i in range(FLAG_TRIALS):
        chosen = dict(BASE)
        for flag in rng.choice(flags, size=int(rng.integers(1, 4)), replace=False):
            values = FLAG_VALUES[str(flag)]
            chosen[str(flag)] = values[int(rng.integers(len(values)))]
        out = exp / "flags" / f"seed{i}"
        argv = ["train", *[str(v) for kv in chosen.items() for v in kv], "--out", out,
                "--no-progress"]
        code, err = run_main(argv, capsys)
        assert_clean_exit(code, err, argv)
        if code == 0:
            (out / "DONE").write_text("finished\n")
        elif out.exists():  # only a run that diverged keeps its directory (and checkpoint)
            assert "diverged" in err, (argv, err)
        outcomes.append(code)
    assert 0 in outcomes and any(outcomes)
    code, err = run_main(["report", exp, "--machine", "fuzz"], capsys)
    assert code == 0, err


# --------------------------------------------------------------------------- typed configs

TYPED_VALUES = [True, False, 0, 3, 1.5, -1.0, math.nan, "x", "", None, [], [1], [1.5],
                {}, {"subset": 5}, {"1": 2}]


def test_every_field_with_every_json_type(tmp_path: Path) -> None:
    """Each TrainConfig field set to each JSON type (as a config.json may hold it): either a
    valid config, or a one-line ValueError; values of the wrong type name the field."""
    import dataclasses
    import typing

    from gnc.config import TrainConfig, is_type

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        for value in TYPED_VALUES:
            try:
                TrainConfig.from_dict({f.name: value}).validate()
            except ValueError as err:
                text = str(err)
                assert "\n" not in text and text, (f.name, value, text)
                if not is_type(hints[f.name], value):
                    assert text.startswith(f"Expected `{f.name}` to be "), (f.name, value, text)
            else:
                assert is_type(hints[f.name], value), (f.name, value)
