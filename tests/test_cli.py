import json
import subprocess
import sys

import numpy as np
import pytest

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


def run_main(argv, capsys) -> tuple[int, str]:
    """``gnc.cli.main(argv)`` in-process: (exit status, stderr)."""
    from gnc.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, match):
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code != 0 and len(lines) == 1, err
    assert "error:" in lines[0] and match in lines[0], lines[0]


TINY_UFM = ["--num-classes", "3", "--per-class", "4", "--feature-dim", "6", "--no-progress"]


def test_experiment_and_bench_check_their_flags(tmp_path, capsys):
    import torch

    out = tmp_path / "exp"
    cases = [
        (["experiment", "ufm10", "--seeds", "0", "--out", out], "`seeds` >= 1, but got 0"),
        (["experiment", "ufm10", "--seeds", "-3", "--out", out], "`seeds` >= 1, but got -3"),
        (["experiment", "ufm10", "--device", "bogus", "--out", out], "'bogus'"),
        (["experiment", "ufm10", "--epochs", "0", "--out", out], "`epochs` >= 1"),
        (["bench", "--device", "bogus", "--sizes", "16x4", "--steps", "none"], "'bogus'"),
        (["bench", "--repeats", "0", "--sizes", "16x4", "--steps", "none"], "--repeats >= 1"),
        (["train", "--preset", "digits", "--dataset", "ufm", "--out", out],
         "Expected input features for backbone 'mlp'"),
        (["train", "--epochs", "x", "--out", out], "invalid int value: 'x'"),
        (["train", "--preset", "ufm10", "--polar-method", "qr", "--out", out],
         "unknown polar_method 'qr'"),
        (["train", "--preset", "ufm10", "--polar-method", "newton_schulz", "--solve-device",
          "cpu", "--out", out], "solve_device='cpu' is for the SVD/eigh methods"),
        (["bench", "--polar", "qr", "--sizes", "16x4", "--steps", "none"],
         "unknown polar method(s) ['qr']"),
        (["train", "--preset", "ufm10", "--graph-head", "--out", out],
         "graph_head needs polar_method newton_schulz"),
        (["train", "--preset", "ufm10", *TINY_UFM, "--graph-head", "--polar-method",
          "newton_schulz", "--device", "cpu", "--out", out],
         "needs one process on a CUDA device, not 1 on cpu"),
    ]
    if not torch.cuda.is_available():
        cases.append((["bench", "--device", "cuda", "--sizes", "16x4", "--steps", "none"],
                      "no CUDA device is available"))
    for argv, match in cases:
        assert_one_line_error(*run_main(argv, capsys), match)
    assert not out.exists()


def test_report_errors_are_one_line(tmp_path, capsys):
    exp = tmp_path / "exp"
    code, _ = run_main(["train", "--preset", "ufm10", "--epochs", "2", *TINY_UFM,
                        "--out", exp / "fixed" / "seed1", "--method", "fixed"], capsys)
    assert code == 0
    (exp / "fixed" / "seed1" / "DONE").write_text("finished\n")
    with open(exp / "fixed" / "seed1" / "metrics.jsonl", "a") as f:
        f.write('{"top1": 1}\n[1, 2]\n')
    assert run_main(["report", exp, "--machine", "m"], capsys)[0] == 0
    (tmp_path / "file").write_text("")
    assert_one_line_error(*run_main(["report", exp, "--out", tmp_path / "file"], capsys),
                          "to be a directory, but it is a file")
    assert_one_line_error(*run_main(["report", tmp_path / "nothing"], capsys),
                          "experiment directory not found")


def test_experiment_refuses_runs_made_with_other_overrides(tmp_path, capsys):
    out = tmp_path / "exp"
    common = ["experiment", "ufm10", "--seeds", "1", "--methods", "fixed", "--out", out,
              "--no-progress", "--no-report"]
    # the preset's own K=10 and d=512 are small enough for 2 iterations
    assert run_main([*common, "--epochs", "2"], capsys)[0] == 0
    assert_one_line_error(*run_main([*common, "--epochs", "3"], capsys),
                          "it was made with epochs=2 (now 3)")


def test_default_batch_size_of_real_data(capsys):
    from gnc.cli import DEFAULT_BATCH_SIZE

    parse = build_parser().parse_args
    cfg = train_config_from_args(parse(["train", "--dataset", "digits", "--out", "x"]))
    assert cfg.batch_size == DEFAULT_BATCH_SIZE == 100
    assert train_config_from_args(parse(["train", "--out", "x"])).batch_size == 0  # ufm
    cfg = train_config_from_args(parse(["train", "--preset", "digits", "--out", "x"]))
    assert cfg.batch_size == 100
    cfg = train_config_from_args(parse(["train", "--dataset", "digits", "--batch-size", "0",
                                        "--out", "x"]))
    assert cfg.batch_size == 0
    from gnc.cli import main

    with pytest.raises(SystemExit, match="0"):
        main(["train", "--help"])
    assert "else 100; full batch for ufm" in " ".join(capsys.readouterr().out.split())


def test_experiment_on_npz_with_train_flags_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    K = 3
    y = np.arange(30) % K
    x = rng.normal(size=(30, 6)).astype(np.float32) + 3 * np.eye(K, 6)[y]
    data = tmp_path / "mine.npz"
    np.savez(data, x=x, y=y, x_test=x[:6], y_test=y[:6])
    out = tmp_path / "exp"
    argv = ["experiment", "--dataset", f"npz:{data}", "--model", "mlp", "--width", "16",
            "--feature-dim", "4", "--batch-size", "6", "--epochs", "2", "--seeds", "2",
            "--sampler", "shuffle", "--label-noise", "0.1", "--lr", "0.05", "--out", out,
            "--no-progress"]
    code, _ = run_main(argv, capsys)
    assert code == 0
    runs = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/*/DONE"))
    assert runs == [f"{m}/seed{s}" for m in ("fixed", "implicit", "standard") for s in (1, 2)]
    cfg = json.loads((out / "standard" / "seed2" / "config.json").read_text())
    assert (cfg["dataset"], cfg["model"], cfg["seed"], cfg["lr"], cfg["label_noise"],
            cfg["sampler"]) == (f"npz:{data}", "mlp", 2, 0.05, 0.1, "shuffle")
    report = (out / "report.md").read_text()
    title = report.splitlines()[0]
    assert title.startswith(f"# custom: npz:{data}, mlp width 16, 2 epochs, batch 6, sgd lr "
                            "0.05") and "label noise 0.1" in title
    assert "## Top-1 train accuracy" in report
    # a preset as the start, flags on top (the report's title then names the overrides;
    # test_experiments checks that): the preset's values stay where no flag is given
    code, _ = run_main(["experiment", "digits", "--dataset", f"npz:{data}", "--epochs", "1",
                        "--seeds", "1", "--methods", "implicit", "--feature-dim", "4",
                        "--out", tmp_path / "exp2", "--no-progress", "--no-report"], capsys)
    assert code == 0
    cfg = json.loads((tmp_path / "exp2" / "implicit" / "seed1" / "config.json").read_text())
    assert (cfg["dataset"], cfg["epochs"], cfg["model"], cfg["width"], cfg["lr"]) == (
        f"npz:{data}", 1, "mlp", 128, 0.2)
    # rerunning with other settings is refused, naming them
    assert_one_line_error(*run_main([*argv[:-3], "--lr", "0.1", "--out", out, "--no-progress"],
                                    capsys), "made with lr=0.05 (now 0.1)")


def test_experiment_seeds_and_methods_are_its_own_flags_and_the_new_train_flags():
    args = build_parser().parse_args(["experiment", "ufm10", "--seed", "3", "--out", "x"])
    assert args.seeds == 3 and args.seed is None and args.method is None  # not train's --seed
    args = build_parser().parse_args(["train", "--out", "x", "--sampler", "shuffle",
                                      "--imbalance", "0.1", "--label-noise", "0.2",
                                      "--dataset", "mnist", "--transforms", "released"])
    cfg = train_config_from_args(args)
    assert (cfg.sampler, cfg.imbalance, cfg.label_noise, cfg.dataset_options) == (
        "shuffle", 0.1, 0.2, {"transforms": "released"})
