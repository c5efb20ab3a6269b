"""`--eval-epochs` evaluates exactly where asked; `--until-epoch` + `--resume` is one run."""

import json

import pytest
import torch

from gnc.cli import build_parser, main, train_config_from_args
from gnc.config import TrainConfig
from gnc.training import train

TIMING = ("time_", "elapsed_s", "peak_mem_mb")
DIGITS = dict(dataset="digits", model="mlp", width=16, feature_dim=16, epochs=6,
              batch_size=100, lr=0.05, schedule="cosine", progress=False, seed=2)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def results(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def test_eval_epochs_evaluate_exactly_there(tmp_path):
    cfg = TrainConfig(**DIGITS, method="fixed", eval_every=0, eval_epochs=[2, 5])
    train(cfg, tmp_path / "run")
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [2, 5, 6]  # and the last
    cfg = TrainConfig(**DIGITS, method="fixed", eval_every=3, eval_epochs=[2])
    train(cfg, tmp_path / "both")
    assert [r["epoch"] for r in rows(tmp_path / "both")] == [2, 3, 6]


def test_cli_eval_epochs_alone_means_only_there():
    parse = build_parser().parse_args
    cfg = train_config_from_args(parse(["train", "--eval-epochs", "10,25,50", "--epochs", "60",
                                        "--out", "x"]))
    assert cfg.eval_epochs == [10, 25, 50] and cfg.eval_every == 0
    cfg = train_config_from_args(parse(["train", "--eval-epochs", "[10]", "--eval-every", "5",
                                        "--epochs", "60", "--out", "x"]))
    assert cfg.eval_epochs == [10] and cfg.eval_every == 5


@pytest.mark.parametrize("bad, match", [
    (dict(eval_epochs=[0]), "eval_epochs"), (dict(eval_epochs=[7]), "eval_epochs"),
    (dict(until_epoch=0), "until_epoch"), (dict(until_epoch=7), "until_epoch"),
    (dict(eval_every=-1), "eval_every"),
    (dict(until_epoch=1, eval_every=2), "until_epoch 1 stops the run before its first "
     r"evaluation \(eval_every 2, eval_epochs none\).*--eval-epochs 1"),
    (dict(until_epoch=2, eval_every=0, eval_epochs=[3]), "before its first evaluation"),
])
def test_bad_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**DIGITS, **bad}).validate()


def test_an_until_epoch_with_an_evaluation_at_or_before_it_is_fine():
    for ok in (dict(until_epoch=1, eval_every=0, eval_epochs=[1]),
               dict(until_epoch=3, eval_every=2),
               dict(until_epoch=DIGITS["epochs"], eval_every=0)):  # the last epoch evaluates
        TrainConfig(**{**DIGITS, **ok}).validate()


@pytest.mark.parametrize("method", ["standard", "implicit"])
def test_until_epoch_then_resume_equals_one_run(tmp_path, method):
    whole = TrainConfig(**DIGITS, method=method, eval_every=2)
    train(whole, tmp_path / "whole")
    part = TrainConfig(**DIGITS, method=method, eval_every=2, until_epoch=3)
    first = train(part, tmp_path / "part")
    assert first["epoch"] == 2  # the last evaluation before the stop
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3  # checkpointed where it stopped, not evaluated there
    assert [r["epoch"] for r in rows(tmp_path / "part")] == [2]
    train(TrainConfig(**DIGITS, method=method, eval_every=2), tmp_path / "part", resume=True)
    assert [results(r) for r in rows(tmp_path / "part")] == [
        results(r) for r in rows(tmp_path / "whole")]
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_until_epoch_from_the_cli_then_a_later_stop(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["train", "--dataset", "digits", "--model", "mlp", "--width", "16",
              "--epochs", "6", "--method", "fixed", "--no-progress", "--out", out]
    main(common + ["--until-epoch", "2"])
    main(common + ["--until-epoch", "4", "--resume"])
    main(common + ["--resume"])
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_experiment_until_epoch_is_a_prefix_of_the_full_experiment(tmp_path):
    from gnc.experiments import run_experiment
    from gnc.rundir import is_done, stopped_after

    settings = {k: v for k, v in DIGITS.items() if k != "seed"} | {"eval_every": 0,
                                                                    "eval_epochs": [2, 4]}
    kw = dict(seeds=1, methods=["standard", "fixed"], report=False)
    run_experiment(None, tmp_path / "whole", overrides=settings, **kw)
    run_experiment(None, tmp_path / "part", overrides=settings | {"until_epoch": 4}, **kw)
    run = tmp_path / "part" / "fixed" / "seed1"
    assert is_done(run) and stopped_after(run) == 4
    assert [r["epoch"] for r in rows(run)] == [2, 4]  # Table 1's early column, reportable
    # the same command again does nothing; without --until-epoch it finishes the runs
    run_experiment(None, tmp_path / "part", overrides=settings | {"until_epoch": 4}, **kw)
    assert [r["epoch"] for r in rows(run)] == [2, 4]
    run_experiment(None, tmp_path / "part", overrides=settings, **kw)
    assert stopped_after(run) is None
    for method in ("standard", "fixed"):
        a, b = (rows(tmp_path / p / method / "seed1") for p in ("whole", "part"))
        assert [results(r) for r in a] == [results(r) for r in b]


def test_a_stopped_run_that_trains_on_is_not_done_until_it_stops_again(tmp_path):
    """The DONE of `--until-epoch 2` ("stopped after epoch 2") stayed while the run was
    continued: interrupted at epoch 4, `gnc report` took it as finished there."""
    from gnc.experiments import _run_steps
    from gnc.report import scan_runs
    from gnc.rundir import is_done, stopped_after

    settings = {k: v for k, v in DIGITS.items() if k != "seed"} | {"eval_every": 1}
    run = tmp_path / "exp" / "fixed" / "seed1"
    cfg = TrainConfig(**settings, method="fixed", seed=1, until_epoch=2)
    for _ in _run_steps(run, cfg, False):
        pass
    assert stopped_after(run) == 2
    steps = _run_steps(run, TrainConfig(**settings, method="fixed", seed=1), False)
    next(steps)  # training on: epoch 3's first step
    assert not is_done(run)
    steps.close()  # Ctrl-C
    assert not is_done(run) and [r["epoch"] for r in rows(run)] == [1, 2]
    with pytest.raises(ValueError, match="no finished runs"):  # not reported as finished
        scan_runs(tmp_path / "exp")
    for _ in _run_steps(run, TrainConfig(**settings, method="fixed", seed=1, until_epoch=4),
                        False):
        pass
    assert stopped_after(run) == 4 and [r["epoch"] for r in rows(run)] == [1, 2, 3, 4]


def test_a_resume_that_ends_where_the_run_stopped_evaluates_that_epoch(tmp_path):
    """Stopped at epoch 3 with no evaluation there, then resumed with ``epochs=3`` (a
    schedule that does not take its shape from the length: decays at fixed epochs): the
    resume trains nothing and makes up epoch 3's evaluation from the checkpoint (its training
    statistics kept there): the row a run evaluating epoch 3 logs."""
    fixed = {**DIGITS, "schedule": "multistep", "milestones": [2, 4]}
    whole = TrainConfig(**fixed, method="implicit", eval_every=2, eval_epochs=[3])
    train(whole, tmp_path / "whole")
    part = tmp_path / "part"
    train(TrainConfig(**fixed, method="implicit", eval_every=2, until_epoch=3), part)
    assert [r["epoch"] for r in rows(part)] == [2]
    ended = TrainConfig(**{**fixed, "epochs": 3}, method="implicit", eval_every=2)
    last = train(ended, part, resume=True)
    want = [results(r) for r in rows(tmp_path / "whole")][:2]
    assert [results(r) for r in rows(part)] == want
    assert results(last) == want[-1]
    ckpt = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["evaluated"] is True
    again = train(ended, part, resume=True)  # done: nothing trained or logged twice
    assert [results(r) for r in rows(part)] == want and results(again) == want[-1]


@pytest.mark.parametrize("schedule, extra", [
    ("cosine", {}), ("onecycle", {}), ("step", {}), ("multistep", {}),
])
def test_a_schedule_that_spans_the_run_cannot_be_resumed_with_other_epochs(
        tmp_path, schedule, extra):
    """Its checkpointed schedule keeps the length it started with: a cosine resumed with
    more epochs reached lr 0 at the old end and rose again. Refused before anything is
    written; a schedule of fixed epochs (or none) may be extended."""
    run = tmp_path / "run"
    cfg = dict(DIGITS, schedule=schedule, **extra, method="standard", eval_every=2)
    train(TrainConfig(**{**cfg, "until_epoch": 3}), run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"its {schedule} schedule spans the 6 epochs it "
                                         "was started with"):
        train(TrainConfig(**{**cfg, "epochs": 8}), run, resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    fixed = dict(cfg, schedule="multistep", milestones=[2])
    train(TrainConfig(**{**fixed, "until_epoch": 3}), tmp_path / "fixed")
    assert train(TrainConfig(**{**fixed, "epochs": 8}), tmp_path / "fixed",
                 resume=True)["epoch"] == 8


def test_elapsed_s_goes_on_across_a_resume(tmp_path, monkeypatch):
    """A resumed run's ``elapsed_s`` adds to its checkpoint's count: in the first part the
    clock jumps by 1000 s after its first reading, so its count is far above anything the
    second part's real clock alone could reach."""
    import gnc.training

    ticks = iter([0.0])
    fake_time = type("T", (), {"perf_counter": staticmethod(lambda: next(ticks, 1000.0))})
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(gnc.training, "time", fake_time)
        train(TrainConfig(**DIGITS, method="fixed", eval_every=2, until_epoch=2), run)
    first = rows(run)[-1]["elapsed_s"]
    assert first >= 1000
    train(TrainConfig(**DIGITS, method="fixed", eval_every=2), run, resume=True)
    elapsed = [r["elapsed_s"] for r in rows(run)]
    assert elapsed[0] == first and first < elapsed[1] < elapsed[2] < first + 600
    # a checkpoint of an older gnc has no count: the resume starts it from 0
    old = tmp_path / "old"
    train(TrainConfig(**DIGITS, method="fixed", eval_every=2, until_epoch=2), old)
    last = old / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["elapsed_s"]
    torch.save(ckpt, last)
    train(TrainConfig(**DIGITS, method="fixed", eval_every=2), old, resume=True)
    assert rows(old)[1]["elapsed_s"] < 600


def test_a_resume_needs_no_flag_of_the_run_again(tmp_path, capsys):
    """`gnc train --out RUN --resume` alone was refused with a diff against the defaults
    (`dataset="digits" (now "ufm")`, ...): every flag had to be typed again. Without
    --preset the run's config.json is the base, but its --until-epoch (to the end); a flag
    given still overrides it, and one a resume cannot change is still refused."""
    out = str(tmp_path / "run")
    main(["train", "--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "4",
          "--method", "fixed", "--no-progress", "--out", out, "--until-epoch", "2"])
    main(["train", "--out", out, "--resume", "--until-epoch", "3"])
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1, 2, 3]
    with pytest.raises(SystemExit):
        main(["train", "--out", out, "--resume", "--tau", "3"])
    assert "tau=" in capsys.readouterr().err
    main(["train", "--out", out, "--resume"])
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]
    # where and how it ran comes from this command (the defaults), the data's place stays
    from gnc.cli import _resumed_config

    base = _resumed_config(build_parser().parse_args(["train", "--out", out, "--resume"]))
    assert base["dataset"] == "digits" and "data_dir" in base
    assert not {"device", "progress", "num_workers", "until_epoch"} & set(base)
    whole = tmp_path / "whole"
    main(["train", "--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "4",
          "--method", "fixed", "--no-progress", "--out", str(whole)])
    assert [results(r) for r in rows(tmp_path / "run")] == [results(r) for r in rows(whole)]
