import dataclasses
import json
import re
import subprocess
import sys
import typing

import numpy as np
import pytest

from gnc.cli import CLIError, build_parser, train_config_from_args


def gnc(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "gnc", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", features=np.zeros((4, 2)), labels=np.zeros(4))
    out = str(tmp_path / "run")
    cases = {
        "unknown preset": (["train", "--preset", "cifar1000", "--out", out], "unknown preset"),
        "unknown method": (["train", "--preset", "ufm10", "--method", "learned", "--out", out],
                           "argument --method: invalid choice: 'learned'"),
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
    # in this process (a fresh interpreter imports torch: ~4 s a case on 2 cores) ...
    from gnc.cli import main

    for name, (args, want) in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(args)
        stderr = capsys.readouterr().err
        assert exit_.value.code != 0, name
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(r"gnc( train| experiment)?: error:", lines[0]), (
            name, stderr)
        assert want in lines[0], (name, lines[0])
    # ... and two as a user meets them: nothing else on stderr (no warning at import)
    for name in ("unknown preset", "missing data"):
        proc = gnc(*cases[name][0])
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0 and stderr.count("\n") == 1, (name, stderr)
        assert cases[name][1] in stderr, (name, stderr)


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


def test_train_help_lists_every_setting_after_a_short_usage_line():
    from gnc.config import TrainConfig

    out = subprocess.run([sys.executable, "-m", "gnc", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines()[0] == "usage: gnc train [--preset NAME] --out DIR [training flags]"
    assert "--resume" in out and "--num-classes" in out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')} " in out or f"--{f.name.replace('_', '-')}," in out
    # choices are shown, bool settings are pairs
    assert "standard | fixed | implicit" in out and "--bias, --no-bias" in out


def test_top_level_help_does_not_import_torch():
    code = ("import sys\nfrom gnc.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "COMMAND" in done.stdout and "train" in done.stdout


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
        (["experiment", "ufm10", "--seeds", "0", "--out", out], "`seeds` in [1, 1000], but got 0"),
        (["experiment", "ufm10", "--seeds", "-3", "--out", out],
         "`seeds` in [1, 1000], but got -3"),
        (["experiment", "ufm10", "--device", "bogus", "--out", out], "'bogus'"),
        (["experiment", "ufm10", "--epochs", "0", "--out", out], "`epochs` >= 1"),
        (["bench", "--device", "bogus", "--sizes", "16x4", "--steps", "none"], "'bogus'"),
        (["bench", "--repeats", "0", "--sizes", "16x4", "--steps", "none"], "--repeats >= 1"),
        (["train", "--preset", "digits", "--dataset", "ufm", "--out", out],
         "Expected input features for backbone 'mlp'"),
        (["train", "--epochs", "x", "--out", out], "invalid int value: 'x'"),
        (["train", "--preset", "ufm10", "--polar-method", "qr", "--out", out],
         "argument --polar-method: invalid choice: 'qr'"),
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
    assert run_main(["report", exp, "--machine", "m", "--out", tmp_path / "two", "--jobs", "2"],
                    capsys)[0] == 0
    assert (tmp_path / "two" / "curve_nc1.png").read_bytes() == (
        exp / "curve_nc1.png").read_bytes()
    assert_one_line_error(*run_main(["report", exp, "--jobs", "0"], capsys), "jobs")
    (tmp_path / "file").write_text("")
    assert_one_line_error(*run_main(["report", exp, "--out", tmp_path / "file"], capsys),
                          "to be a directory, but it is a file")
    assert_one_line_error(*run_main(["report", tmp_path / "nothing"], capsys),
                          "experiment directory not found")


def test_report_unfinished_includes_a_run_without_done(tmp_path, capsys):
    exp = tmp_path / "exp"
    assert run_main(["train", "--preset", "ufm10", "--epochs", "2", *TINY_UFM, "--out",
                     exp / "fixed" / "seed1", "--method", "fixed"], capsys)[0] == 0
    assert_one_line_error(*run_main(["report", exp], capsys), "no finished runs under")
    assert run_main(["report", exp, "--unfinished", "--machine", "m"], capsys)[0] == 0
    assert "- fixed/seed1: last evaluated epoch 2" in (exp / "report.md").read_text()


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
    # main([...]) from Python: the command is the one given, not a run_experiment call
    assert f"gnc experiment --dataset npz:{data} --model mlp" in report
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


# --------------------------------------------------------------------------- flags from the config


def _flag_and_value(f: dataclasses.Field, hint) -> tuple[list[str], object]:
    """Command-line words that set the TrainConfig field ``f`` to a non-default value, and
    that value."""
    flag = "--" + f.name.replace("_", "-")
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    choices = f.metadata.get("choices")
    if kind is bool:
        value = f.default is not True  # also for bool | None (default None)
        return [flag if value else "--no-" + flag[2:]], value
    if choices:
        value = next(c for c in choices if c != f.default)
        return [flag, value], value
    if kind is int:
        return [flag, "7"], 7
    if kind is float:
        return [flag, "0.25"], 0.25
    if kind is str:
        return [flag, "elsewhere"], "elsewhere"
    if kind is dict:
        return [flag, '{"subset": 3}'], {"subset": 3}
    if typing.get_origin(kind) is list:
        return [flag, "[5, 7]"], [5, 7]
    raise AssertionError(f"no test value for {f.name}: {hint}")


@pytest.mark.parametrize("command", ["train", "experiment"])
def test_every_config_field_is_a_flag(command):
    from gnc.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    parser = build_parser()
    for f in dataclasses.fields(TrainConfig):
        words, value = _flag_and_value(f, hints[f.name])
        argv = [command, *words, "--out", "x"]
        if command == "experiment" and f.name in ("method", "seed"):
            continue  # experiment runs every method x seed: --seed is --seeds there
        cfg = train_config_from_args(parser.parse_args(argv))
        assert getattr(cfg, f.name) == value, (argv, getattr(cfg, f.name))
        assert getattr(cfg, f.name) != getattr(TrainConfig(), f.name), f.name


def test_flags_not_given_keep_the_preset_and_none_unsets():
    parse = build_parser().parse_args
    cfg = train_config_from_args(parse(["train", "--preset", "digits", "--out", "x"]))
    assert (cfg.feature_dim, cfg.bias, cfg.small_input) == (64, True, None)
    cfg = train_config_from_args(parse(["train", "--preset", "digits", "--feature-dim", "NONE",
                                        "--no-bias", "--small-input", "--out", "x"]))
    assert (cfg.feature_dim, cfg.bias, cfg.small_input) == (None, False, True)
    cfg = train_config_from_args(parse(["train", "--schedule", "multistep", "--milestones",
                                        "null", "--no-small-input", "--out", "x"]))
    assert (cfg.milestones, cfg.small_input) == (None, False)


def test_todays_flag_spellings_still_parse():
    argv = ["train", "--out", "x", "--no-bias", "--no-progress", "--download", "--tensorboard",
            "--compile", "--channels-last", "--graph-head", "--save-classifier"]
    cfg = train_config_from_args(build_parser().parse_args(argv))
    assert (cfg.bias, cfg.progress) == (False, False)
    assert all((cfg.download, cfg.tensorboard, cfg.compile, cfg.channels_last, cfg.graph_head,
                cfg.save_classifier))


def test_dataset_options_merge_with_the_preset_and_the_shortcuts(capsys):
    parse = build_parser().parse_args
    cfg = train_config_from_args(parse(["train", "--preset", "ufm10", "--dataset-options",
                                        '{"per_class": 7, "subset": 2}', "--num-classes", "4",
                                        "--out", "x"]))
    assert cfg.dataset_options == {"num_classes": 4, "per_class": 7, "subset": 2}
    cfg = train_config_from_args(parse(["train", "--dataset-options", '{"subset": 5}',
                                        "--subset", "5", "--out", "x"]))
    assert cfg.dataset_options == {"subset": 5}
    with pytest.raises(CLIError, match="--subset 6 and --dataset-options subset=5 disagree"):
        train_config_from_args(parse(["train", "--dataset-options", '{"subset": 5}',
                                      "--subset", "6", "--out", "x"]))
    assert_one_line_error(*run_main(["train", "--dataset-options", '{"subset": 5}', "--subset",
                                     "6", "--out", "x"], capsys), "disagree")


def test_choices_and_types_are_usage_errors_of_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["train", "--method", "bogus"], "argument --method: invalid choice: 'bogus'"),
        (["experiment", "ufm10", "--loss", "l2"], "argument --loss: invalid choice: 'l2'"),
        (["train", "--feature-dim", "big"], "argument --feature-dim: invalid int value: 'big'"),
        (["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["train", "--milestones", "[100, 150"], "argument --milestones: invalid JSON"),
        (["train", "--milestones", '["a"]'],
         "argument --milestones: Expected `milestones` to be list[int] | None"),
        (["train", "--dataset-options", "[1]"],
         "argument --dataset-options: Expected `dataset_options` to be dict"),
        (["train", "--dataset-options", "null"], "Expected `dataset_options` to be dict"),
        (["train", "--no-bias=1"], "ignored explicit argument"),
    ]
    for argv, match in cases:
        code, err = run_main([*argv, "--out", out], capsys)
        assert code == 2
        assert_one_line_error(code, err, match)
    assert not out.exists()


def test_bench_set_overrides():
    from gnc.cli import _overrides

    assert _overrides(["width=16", "solve_device=cpu", "polar_method=\"gram\"", "model=mlp",
                       "milestones=[2, 3]", "dataset_options={\"subset\": 50}",
                       "feature_dim=null", "graph_head=true", "lr=1"]) == {
        "width": 16, "solve_device": "cpu", "polar_method": "gram", "model": "mlp",
        "milestones": [2, 3], "dataset_options": {"subset": 50}, "feature_dim": None,
        "graph_head": True, "lr": 1}
    assert _overrides(["dataset=123"]) == {"dataset": "123"}  # a str field: the raw string
    cases = [
        ("width", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("width=abc", "invalid JSON 'abc'"),
        ("width=\"16\"", "Expected `width` to be int, but got '\"16\"'"),
        ("width=true", "Expected `width` to be int"),
        ("graph_head=1", "Expected `graph_head` to be bool"),
        ("milestones=[1.5]", "Expected `milestones` to be list[int] | None"),
        ("widht=16", "unknown key 'widht'; choose from dataset, dataset_options, model, width"),
        ("method=fixed", "give method by --methods"),
        ("device=cuda", "give device by --device"),
    ]
    for item, match in cases:
        with pytest.raises(CLIError, match=re.escape(match)):
            _overrides([item])


def test_bench_set_errors_are_one_line(capsys):
    argv = ["bench", "--sizes", "none", "--steps", "none", "--epoch", "cifar10-resnet18"]
    assert_one_line_error(*run_main([*argv, "--set", "widht=16"], capsys), "unknown key 'widht'")
    assert_one_line_error(*run_main([*argv, "--set", "width=x"], capsys), "invalid JSON 'x'")
    assert_one_line_error(*run_main(["bench", "--device", "cuda:x", "--sizes", "16x4", "--steps",
                                     "none"], capsys), "'cuda:x'")


# --------------------------------------------------------------------------- user errors vs bugs


@pytest.fixture
def presets_raising(monkeypatch):
    """Make ``gnc presets`` raise the given exception."""
    import gnc.cli as cli

    def use(err: BaseException) -> None:
        def raise_it(args):
            raise err

        monkeypatch.setattr(cli, "_cmd_presets", raise_it)

    return use


def test_a_bug_keeps_its_traceback(presets_raising, capsys):
    from gnc.cli import main

    presets_raising(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        main(["presets"])
    presets_raising(TypeError("bad call"))
    with pytest.raises(TypeError, match="bad call"):
        main(["presets"])
    assert capsys.readouterr().err == ""  # nothing printed: the traceback is Python's


@pytest.mark.parametrize("err, match", [
    (ValueError("Expected `x` >= 1\nsecond line"), "gnc: error: Expected `x` >= 1"),
    (FileNotFoundError("no such file: data/x"), "gnc: error: no such file: data/x"),
    (FloatingPointError("training diverged"), "gnc: error: training diverged"),
    (CLIError("bad flags"), "gnc: error: bad flags"),
])
def test_user_errors_are_one_line(presets_raising, capsys, err, match):
    presets_raising(err)
    code, stderr = run_main(["presets"], capsys)
    assert code == 2 and stderr.strip() == match


def test_cuda_out_of_memory_is_one_line_and_interrupt_exits_130(presets_raising, capsys):
    import torch

    presets_raising(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    code, stderr = run_main(["presets"], capsys)
    assert code == 2 and stderr.strip() == "gnc: error: CUDA out of memory. Tried to allocate 2 GiB"
    presets_raising(KeyboardInterrupt())
    code, stderr = run_main(["presets"], capsys)
    assert code == 130 and stderr.strip() == "gnc: interrupted"


def test_cpu_out_of_memory_is_one_line(capsys):
    """torch's CPU allocator raises a RuntimeError (not OutOfMemoryError): a real one, from a
    layer bench of an impossible size."""
    code, stderr = run_main(["bench", "--sizes", "99999999x99999", "--steps", "none",
                             "--repeats", "1"], capsys)
    assert code == 2 and stderr.strip().startswith(
        "gnc: error: out of CPU memory: can't allocate memory: you tried to allocate")
    assert "\n" not in stderr.strip()


def test_a_bug_in_a_subprocess_prints_its_traceback(tmp_path):
    code = ("import gnc.cli as cli\n"
            "def boom(args):\n    raise RuntimeError('boom')\n"
            "cli._cmd_presets = boom\ncli.main(['presets'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: boom" in done.stderr


def test_implicit_nograd_refuses_a_backward_it_would_ignore(tmp_path, capsys):
    """The ablation fixes backward 'none'; `--backward ddn` ran without it and config.json
    recorded ddn."""
    code, err = run_main(["train", "--preset", "ufm10", "--method", "implicit-nograd",
                          "--backward", "ddn", "--out", tmp_path / "r"], capsys)
    assert_one_line_error(code, err, "always none")
    assert not (tmp_path / "r").exists()


def test_an_interrupted_run_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Ctrl-C during `gnc train` printed only "gnc: interrupted": nothing said that the
    checkpoints stay for --resume (an experiment: that the same command resumes)."""
    import gnc.experiments
    import gnc.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gnc.training, "train", interrupted)
    monkeypatch.setattr(gnc.experiments, "run_experiment", interrupted)
    code, err = run_main(["train", "--preset", "ufm10", "--out", tmp_path / "my run",
                          "--overwrite"], capsys)
    assert code == 130 and err.strip() == (f"gnc: interrupted (gnc train --out "
                                           f"'{tmp_path / 'my run'}' --resume continues from "
                                           "its last checkpoint)")
    code, err = run_main(["experiment", "ufm10", "--out", tmp_path / "exp"], capsys)
    assert code == 130 and err.strip() == ("gnc: interrupted (the same command again resumes "
                                           "the unfinished runs)")


def test_report_table_epochs_start_at_1(tmp_path, capsys):
    """`gnc report --table-epochs -3,5` was taken, and the table said "epoch -3 was not
    evaluated"."""
    code, err = run_main(["report", tmp_path, "--table-epochs=-3,5"], capsys)
    assert code == 2 and err.strip() == "gnc: error: bad --table-epochs '-3,5': epochs start at 1"
    code, err = run_main(["report", tmp_path, "--table-epochs", "0,5"], capsys)
    assert code == 2 and "epochs start at 1" in err
