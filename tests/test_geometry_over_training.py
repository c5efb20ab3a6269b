"""The geometry over training: ETF distances in metrics.jsonl, saved classifiers, and
`gnc evaluate` of any kept checkpoint (--checkpoint N, --all, --save-classifier)."""

import json
import math

import pytest
import torch

from gnc.config import TrainConfig
from gnc.etf import simplex_etf
from gnc.rundir import holds_results, prepare_run_dir, strict_json
from gnc.saved_runs import evaluate_checkpoints, evaluate_run
from gnc.training import Trainer, train

ETF_KEYS = ("etf_w_dist", "etf_h_dist", "etf_wh_dist", "etf_w_moved", "etf_h_moved")
METHODS = ("standard", "fixed", "implicit", "implicit-nograd", "standard-unnormalized")
TINY = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 6}, model="ufm",
            feature_dim=8, epochs=4, lr=0.5, progress=False, eval_every=2)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def rows_of(path):
    """The rows of a metrics file, read as strict JSON (a NaN literal is an error)."""
    return [json.loads(line, parse_constant=_not_json) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_logs_etf_distances_and_saves_its_classifier(tmp_path, method):
    trainer = Trainer(TrainConfig(**TINY, method=method, save_classifier=True), tmp_path / "r")
    trainer.fit()
    rows = rows_of(tmp_path / "r" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [2, 4]
    for row in rows:
        assert set(ETF_KEYS) | {"vci", "numerical_rank"} <= row.keys()
    assert rows[0]["etf_w_moved"] is None and math.isfinite(rows[1]["etf_w_moved"])
    assert all(math.isfinite(rows[1][k]) for k in ETF_KEYS)
    if method == "fixed":  # the fixed ETF is an exact ETF that never moves
        assert rows[1]["etf_w_dist"] == pytest.approx(0.0, abs=1e-6)
        assert rows[1]["etf_w_moved"] == pytest.approx(0.0, abs=1e-6)
    if method.startswith("implicit"):  # W is an ETF (float32) at every step
        assert rows[1]["etf_w_dist"] == pytest.approx(0.0, abs=1e-5)
    head = trainer.model.head
    saved = torch.load(tmp_path / "r" / "classifier" / "epoch_0004.pt", weights_only=False)
    assert saved["epoch"] == 4 and saved["split"] == "train"
    torch.testing.assert_close(saved["W"], head.weight.detach().cpu())
    want_b = head.bias if head.bias is not None else torch.zeros(4)
    torch.testing.assert_close(saved["b"], want_b.detach().cpu())
    assert ("U" in saved) == (method not in ("standard", "standard-unnormalized"))
    if "U" in saved:
        torch.testing.assert_close(simplex_etf(4, saved["U"]), saved["W"])
    x, y = trainer.eval_bundle.train.tensors
    with torch.no_grad():
        h = trainer.model.eval()(x)[1].double()
    means = torch.stack([h[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(saved["class_means"], means)
    assert saved["counts"].tolist() == [6] * 4
    assert sorted(p.name for p in (tmp_path / "r" / "classifier").iterdir()) == [
        "epoch_0002.pt", "epoch_0004.pt"]


def test_no_classifier_files_by_default_and_nothing_else_changes(tmp_path):
    train(TrainConfig(**TINY, method="implicit"), tmp_path / "a")
    train(TrainConfig(**TINY, method="implicit", save_classifier=True), tmp_path / "b")
    assert not (tmp_path / "a" / "classifier").exists()
    a, b = rows_of(tmp_path / "a" / "metrics.jsonl"), rows_of(tmp_path / "b" / "metrics.jsonl")
    skip = {"elapsed_s", "peak_mem_mb"} | {k for k in a[0] if k.startswith("time_")}
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in skip} == \
               {k: v for k, v in rb.items() if k not in skip}


def test_resumed_run_logs_the_same_etf_distances(tmp_path):
    base = dict(TINY, method="implicit", eval_every=1)
    train(TrainConfig(**{**base, "epochs": 4}), tmp_path / "full")
    train(TrainConfig(**{**base, "epochs": 2}), tmp_path / "split")
    train(TrainConfig(**{**base, "epochs": 4}), tmp_path / "split", resume=True)
    full = rows_of(tmp_path / "full" / "metrics.jsonl")
    split = rows_of(tmp_path / "split" / "metrics.jsonl")
    assert [r["epoch"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(full[2:], split[2:], strict=True):  # epoch 3 "moved" needs epoch 2's ETFs
        for key in ETF_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (b["epoch"], key)


@pytest.fixture
def kept(tmp_path):
    """A run with checkpoints (and evaluations) at epochs 2, 4 and 6, and a test split."""
    cfg = TrainConfig(dataset="digits", model="mlp", width=16, feature_dim=16, epochs=6,
                      batch_size=300, lr=0.05, method="standard", checkpoint_every=2,
                      eval_every=2, progress=False)
    train(cfg, tmp_path / "run")
    return tmp_path / "run"


def test_evaluate_any_kept_checkpoint(kept):
    logged = {r["epoch"]: r for r in rows_of(kept / "metrics.jsonl")}
    for epoch in (2, 4, 6):
        got = evaluate_run(kept, device="cpu", checkpoint=epoch)
        assert got["epoch"] == epoch and got["split"] == "train"
        for key in ("nc1", "vci", "numerical_rank", "top1", "etf_w_dist", "etf_h_dist"):
            assert got[key] == pytest.approx(logged[epoch][key], rel=1e-6, abs=1e-9), key
        assert math.isnan(got["etf_w_moved"])  # one checkpoint: no previous evaluation
    assert not (kept / "classifier").exists()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of epoch 3 \(kept epochs: "
                                                r"2, 4, 6; see --checkpoint-every\)"):
        evaluate_run(kept, device="cpu", checkpoint=3)


def test_evaluate_all_appends_one_line_per_kept_epoch(kept):
    logged = {r["epoch"]: r for r in rows_of(kept / "metrics.jsonl")}
    rows = evaluate_checkpoints(kept, device="cpu", save_classifier=True)
    assert [r["epoch"] for r in rows] == [2, 4, 6]
    assert rows_of(kept / "evaluate_train.jsonl") == json.loads(strict_json(rows))
    for row in rows[1:]:  # moved since the previous checkpoint = since the previous evaluation
        for key in ETF_KEYS:
            assert row[key] == pytest.approx(logged[row["epoch"]][key], rel=1e-6), key
    assert sorted(p.name for p in (kept / "classifier").iterdir()) == [
        "epoch_0002.pt", "epoch_0004.pt", "epoch_0006.pt"]
    test_rows = evaluate_checkpoints(kept, split="test", device="cpu", out=kept / "t.jsonl")
    assert len(rows_of(kept / "t.jsonl")) == 3 and test_rows[0]["split"] == "test"
    evaluate_checkpoints(kept, split="test", device="cpu", out=kept / "t.jsonl")
    assert len(rows_of(kept / "t.jsonl")) == 6  # appended


def test_classifier_files_count_as_results_and_overwrite_removes_them(kept):
    evaluate_run(kept, device="cpu", save_classifier=True)
    assert (kept / "classifier" / "epoch_0006.pt").exists()
    prepare_run_dir(kept, overwrite=True)
    assert not (kept / "classifier").exists() and not holds_results(kept)
    (kept / "classifier").mkdir()
    torch.save({}, kept / "classifier" / "epoch_0001.pt")
    assert holds_results(kept)


def test_cli_evaluate_checkpoint_all_and_save_classifier(kept, capsys):
    from tests.test_cli import assert_one_line_error, run_main

    code, _ = run_main(["evaluate", kept, "--checkpoint", "4", "--device", "cpu"], capsys)
    assert code == 0
    code, _ = run_main(["evaluate", kept, "--all", "--device", "cpu", "--save-classifier",
                        "--split", "test"], capsys)
    assert code == 0
    assert len(rows_of(kept / "evaluate_test.jsonl")) == 3
    assert (kept / "classifier" / "epoch_0004_test.pt").exists()
    for argv, match in [(["--all", "--checkpoint", "2"], "choose one of --checkpoint N"),
                        (["--out", kept / "x.jsonl"], "--out is the metrics file of --all"),
                        (["--checkpoint", "5"], "no checkpoint of epoch 5")]:
        assert_one_line_error(*run_main(["evaluate", kept, "--device", "cpu", *argv], capsys),
                              match)


def test_cli_train_and_experiment_pass_save_classifier(tmp_path, capsys):
    from gnc.cli import build_parser, train_config_from_args
    from tests.test_cli import TINY_UFM, run_main

    parse = build_parser().parse_args
    assert not train_config_from_args(parse(["train", "--out", "x"])).save_classifier
    assert train_config_from_args(parse(["train", "--out", "x", "--save-classifier"])
                                  ).save_classifier
    out = tmp_path / "exp"
    code, _ = run_main(["experiment", "ufm10", "--seeds", "1", "--methods", "fixed",
                        "--epochs", "2", "--out", out, "--no-progress", "--save-classifier"],
                       capsys)
    assert code == 0
    assert (out / "fixed" / "seed1" / "classifier" / "epoch_0002.pt").exists()
    code, _ = run_main(["train", "--preset", "ufm10", "--epochs", "2", *TINY_UFM, "--out",
                        tmp_path / "one", "--save-classifier"], capsys)
    assert code == 0 and (tmp_path / "one" / "classifier" / "epoch_0002.pt").exists()


def test_evaluate_with_save_classifier_is_a_writer_and_takes_the_lock(kept):
    """`gnc evaluate RUN --save-classifier` wrote into a run that another process was
    training; `--all` on a folder that is no run left a `.lock` in it."""
    import fcntl

    from gnc.rundir import LOCK_FILE, RunLockedError

    with open(kept / LOCK_FILE, "a") as held:  # as a training process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunLockedError, match="in use by another gnc process"):
            evaluate_run(kept, device="cpu", save_classifier=True)
        assert not (kept / "classifier").exists()
        evaluate_run(kept, device="cpu")  # reading needs no lock
    other = kept.parent / "notes"
    other.mkdir()
    for call in (lambda: evaluate_checkpoints(other, device="cpu"),
                 lambda: evaluate_run(other, device="cpu", save_classifier=True)):
        with pytest.raises(FileNotFoundError, match="config.json"):
            call()
        assert not (other / LOCK_FILE).exists()
