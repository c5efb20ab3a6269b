import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from gnc.build import build_model
from gnc.data import DatasetBundle, make_loader
from gnc.experiments import PRESETS, custom_preset, get_preset, run_dir, run_experiment

SHAPES = {"ufm": (), "digits": (64,), "mnist1d": (40,), "mnist": (3, 32, 32),
          "cifar10": (3, 32, 32),
          "cifar100": (3, 32, 32), "stl10": (3, 96, 96), "imagenet": (3, 224, 224)}
CLASSES = {"ufm": None, "cifar100": 100, "imagenet": 1000}


def fake_bundle(cfg) -> DatasetBundle:
    K = CLASSES.get(cfg.dataset) or cfg.dataset_options.get("num_classes", 10)
    per_class = 2
    y = torch.arange(K).repeat(per_class)
    shape = SHAPES[cfg.dataset]
    x = torch.arange(len(y)) if shape == () else torch.randn(len(y), *shape)
    data = TensorDataset(x, y)
    return DatasetBundle(data, None, K, shape, y, cfg.dataset)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    preset = get_preset(name)
    cfg = preset.train_config()
    cfg.validate()
    bundle = fake_bundle(cfg)
    model = build_model(cfg, bundle)
    K = bundle.num_classes
    loader = make_loader(bundle, 2 * K, stratified=cfg.sampler == "stratified", drop_last=True,
                         shuffle=cfg.sampler == "shuffle")
    x, y = next(iter(loader))
    model.eval()
    with torch.no_grad():
        logits, h = model(x[:2])
    assert logits.shape == (2, K) and h.shape[0] == 2
    # one training step of the head on features of every class (cheap at any K)
    model.head.train()
    feats = torch.randn(2 * K, h.shape[1])
    assert model.head(feats, torch.arange(K).repeat(2)).shape == (2 * K, K)
    assert preset.notes and preset.summary
    assert preset.table_epochs[0] < preset.table_epochs[1] <= cfg.epochs


def test_experiment_runs_reports_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    kw = dict(seeds=2, methods=["standard", "implicit"],
              overrides={"epochs": 4, "eval_every": 2, "progress": False,
                         "dataset_options": {"num_classes": 3, "per_class": 4},
                         "feature_dim": 8})
    dirs = run_experiment("ufm10", out, **kw)
    assert sorted(p.relative_to(out).as_posix() for p in dirs) == [
        "implicit/seed1", "implicit/seed2", "standard/seed1", "standard/seed2"]
    report = (out / "report.md").read_text()
    for section in ("## Curves", "PCM at EoT", "## Top-1 train accuracy", "## Final metrics",
                    "## Time per training step"):
        assert section in report
    for png in ("curves.png", "cos_margins.png", "curve_nc1.png", "curve_train_loss.png"):
        assert (out / png).stat().st_size > 1000

    import gnc.experiments as experiments

    calls = []

    class Recording(experiments.Trainer):
        def __init__(self, cfg, path, *args, **kw):
            calls.append(path)
            super().__init__(cfg, path, *args, **kw)

    monkeypatch.setattr(experiments, "Trainer", Recording)
    run_experiment("ufm10", out, **kw)
    assert calls == []  # nothing retrained
    import shutil

    shutil.rmtree(run_dir(out, "implicit", 2))
    run_experiment("ufm10", out, **kw)
    assert calls == [run_dir(out, "implicit", 2)]


def test_interrupted_run_resumes(tmp_path):
    out = tmp_path / "exp"
    kw = dict(seeds=1, methods=["fixed"], report=False,
              overrides={"epochs": 4, "eval_every": 2, "checkpoint_every": 2,
                         "progress": False, "feature_dim": 8,
                         "dataset_options": {"num_classes": 3, "per_class": 4}})
    run_experiment("ufm10", out, **kw)
    path = run_dir(out, "fixed", 1)
    rows_full = (path / "metrics.jsonl").read_text()
    # as if killed during epoch 3: the last checkpoint is epoch 2, no DONE
    (path / "DONE").unlink()
    ckpts = path / "checkpoints"
    (ckpts / "last.pt").write_bytes((ckpts / "epoch_0002.pt").read_bytes())
    (ckpts / "epoch_0004.pt").unlink()
    lines = rows_full.splitlines(keepends=True)
    (path / "metrics.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # torn
    run_experiment("ufm10", out, **kw)
    assert (path / "DONE").exists()
    assert _untimed(path / "metrics.jsonl") == _untimed(rows_full)  # epochs 3-4 trained again
    # killed before its first checkpoint: started afresh, same result
    (path / "DONE").unlink()
    for f in ckpts.iterdir():
        f.unlink()
    (path / "metrics.jsonl").write_text(lines[0])
    run_experiment("ufm10", out, **kw)
    assert _untimed(path / "metrics.jsonl") == _untimed(rows_full)


def _untimed(source) -> list[dict]:
    """Metrics rows without the fields that measure time or memory."""
    text = source if isinstance(source, str) else source.read_text()
    drop = ("time_", "elapsed_s", "peak_mem_mb")
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
            for line in text.splitlines()]


def test_report_table_matches_runs(tmp_path):
    out = tmp_path / "exp"
    run_experiment("ufm10", out, seeds=3, methods=["implicit"],
                   overrides={"epochs": 4, "eval_every": 2, "progress": False,
                              "dataset_options": {"num_classes": 3, "per_class": 4},
                              "feature_dim": 8})
    finals = sorted(json.loads((run_dir(out, "implicit", s) / "metrics.jsonl").read_text()
                               .splitlines()[-1])["train_top1"] for s in (1, 2, 3))
    expected = f"{finals[1]:.2f} [{finals[0]:.2f}, {finals[2]:.2f}]"
    assert expected in (out / "report.md").read_text()
    assert not math.isnan(finals[1])


def test_unknown_method_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        run_experiment("ufm10", tmp_path, methods=["standard", "learned"])
    assert not any(tmp_path.iterdir())


TINY = {"epochs": 2, "eval_every": 1, "progress": False,
        "dataset_options": {"num_classes": 3, "per_class": 4}, "feature_dim": 8}


def test_finished_runs_with_other_overrides_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    run_experiment("ufm10", out, seeds=1, methods=["fixed"], report=False, overrides=TINY)
    import gnc.experiments as experiments

    monkeypatch.setattr(experiments, "Trainer", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"finished run .*fixed/seed1 does not match this "
                                         r"experiment: it was made with epochs=2 \(now 3\)"):
        run_experiment("ufm10", out, seeds=1, methods=["fixed"], report=False,
                       overrides={**TINY, "epochs": 3})
    # where and how it ran does not matter
    run_experiment("ufm10", out, seeds=1, methods=["fixed"], report=False,
                   overrides={**TINY, "device": "cpu", "data_dir": "elsewhere"})
    # a run made before a setting existed used that setting's default: still the same run
    config = out / "fixed" / "seed1" / "config.json"
    saved = json.loads(config.read_text())
    for key in ("bias", "loss", "imbalance", "label_noise", "save_classifier"):
        saved.pop(key)
    config.write_text(json.dumps(saved))
    run_experiment("ufm10", out, seeds=1, methods=["fixed"], report=False, overrides=TINY)
    with pytest.raises(ValueError, match=r"it was made with bias=true \(now false\)"):
        run_experiment("ufm10", out, seeds=1, methods=["fixed"], report=False,
                       overrides={**TINY, "bias": False})


def test_an_interrupted_cosine_run_is_not_resumed_with_other_epochs(tmp_path, monkeypatch):
    """Resumed, its checkpointed cosine kept the old length (lr 0 at the old end, then rising
    again) while config.json said the new one, and the report mixed it with fresh runs.
    Refused before any run of the experiment trains."""
    out = tmp_path / "exp"
    cosine = {**TINY, "schedule": "cosine", "epochs": 4}
    run_experiment("ufm10", out, seeds=1, methods=["fixed"], report=False,
                   overrides={**cosine, "until_epoch": 2, "eval_every": 1})
    import gnc.experiments as experiments

    monkeypatch.setattr(experiments, "Trainer", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"cannot resume .*fixed/seed1 with epochs=6: its "
                                         "cosine schedule spans the 4 epochs"):
        run_experiment("ufm10", out, seeds=2, methods=["fixed"], report=False,
                       overrides={**cosine, "epochs": 6})


def test_seeds_must_be_positive_and_configs_valid_before_training(tmp_path):
    for seeds in (0, -2, 99999999999):  # the last: a plan of 10^11 runs, built forever
        with pytest.raises(ValueError, match=rf"Expected `seeds` in \[1, 1000\], but got {seeds}"):
            run_experiment("ufm10", tmp_path, seeds=seeds, overrides=TINY)
    with pytest.raises(ValueError, match="Expected `device` to be auto, cpu, cuda or cuda:N"):
        run_experiment("ufm10", tmp_path, seeds=1, overrides={**TINY, "device": "bogus"})
    with pytest.raises(ValueError, match="Expected `epochs` >= 1"):
        run_experiment("ufm10", tmp_path, seeds=1, overrides={**TINY, "epochs": 0})
    assert not any(tmp_path.iterdir())


def test_report_title_names_the_overrides(tmp_path):
    out = tmp_path / "exp"
    run_experiment("ufm10", out, seeds=1, methods=["implicit"], overrides=TINY)
    first = (out / "report.md").read_text().splitlines()[0]
    assert first.startswith(f"# ufm10: {get_preset('ufm10').summary} (overridden: ")
    assert "epochs=2" in first and "eval_every=1" in first
    assert "progress" not in first and "method" not in first
    # called from Python: the report's command is that call (it said `gnc report EXP`)
    text = (out / "report.md").read_text()
    assert f"run_experiment('ufm10', '{out}', seeds=1, methods=['implicit'], overrides=" in text
    assert "gnc report" not in text


def test_released_and_long_tailed_presets():
    mnist = get_preset("mnist-resnet18-agd").config
    assert {k: mnist[k] for k in ("dataset", "model", "optimizer", "lr", "bias", "tau",
                                  "batch_size", "epochs", "schedule", "sampler")} == {
        "dataset": "mnist", "model": "resnet18", "optimizer": "agd", "lr": 10.0, "bias": False,
        "tau": 5.0, "batch_size": 256, "epochs": 200, "schedule": "none",
        "sampler": "stratified"}
    assert mnist["dataset_options"] == {"transforms": "released"}
    # the released resnet.py's ImageNet stem on 32 px: 7x7 stride 2 and a max-pool
    from gnc.models import build_backbone

    net, _ = build_backbone("resnet18", in_shape=(3, 32, 32), small_input=mnist["small_input"])
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].kernel_size == (7, 7) and convs[0].stride == (2, 2)
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    for name, data in (("cifar10-lt-resnet18", "cifar10"), ("cifar100-lt-resnet18", "cifar100")):
        preset = get_preset(name)
        assert preset.gpu and preset.config["dataset"] == data
        assert preset.config["imbalance"] == 0.01 and preset.config["sampler"] == "shuffle"


def test_experiment_without_preset_on_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for c in ("a", "b", "c"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / split / c / f"{i}.png")
    out = tmp_path / "exp"
    config = {"dataset": f"imagefolder:{tmp_path / 'img'}", "model": "mlp", "width": 16,
              "feature_dim": 4, "batch_size": 6, "epochs": 2, "progress": False,
              "label_noise": 0.25, "imbalance": 0.5, "sampler": "shuffle"}
    dirs = run_experiment(None, out, seeds=1, overrides=config, report=False)
    assert len(dirs) == 3 and all((d / "DONE").exists() for d in dirs)
    saved = json.loads((out / "implicit" / "seed1" / "config.json").read_text())
    assert saved["label_noise"] == 0.25 and saved["imbalance"] == 0.5
    summary = custom_preset(config).summary  # the report's title (checked in test_cli)
    assert summary.startswith(f"imagefolder:{tmp_path / 'img'}, mlp width 16, 2 epochs, "
                              "batch 6, sgd lr 0.1")
    assert "long tail R=0.5" in summary and "label noise 0.25" in summary
    assert "shuffle batches" in summary
    with pytest.raises(ValueError, match=r"made with imbalance=0.5 \(now 1.0\)"):
        run_experiment(None, out, seeds=1, overrides={**config, "imbalance": 1.0})


def test_every_preset_summary_states_the_batch_it_trains_with():
    """The CIFAR presets said "batch 256" while their stratified batches hold batch // K of
    every class: 250 for CIFAR-10 and 200 for CIFAR-100."""
    import re

    from gnc.experiments import _CLASSES

    classes = {**_CLASSES, "digits": 10, "mnist1d": 10, "mnist": 10}
    checked = []
    for preset in PRESETS.values():
        cfg = preset.train_config()
        K = cfg.dataset_options.get("num_classes") or classes[cfg.dataset]
        b = cfg.batch_size
        if b == 0:
            assert "full batch" in preset.summary, preset.name
            continue
        held = b // K * K if cfg.sampler == "stratified" else b
        stated = re.search(r"batch (\d+)", preset.summary)  # cifar10-small states none
        assert stated is None or int(stated.group(1)) == held, (preset.name, held)
        checked.append(preset.name)
    assert {"cifar10-resnet18", "cifar100-resnet18", "mnist-resnet18-agd", "ufm1000"} <= set(
        checked)


def test_a_custom_summary_states_what_a_stratified_batch_holds():
    """A preset-less experiment's title said "batch 256" for stratified batches, which hold
    256 // K samples of each class (250 for K = 10); the config does not know K."""
    from gnc.config import describe_config

    base = {"dataset": "imagefolder:/d", "model": "mlp", "batch_size": 256}
    assert "batch 256 // K of each class" in describe_config(base)
    assert "batch 256," not in describe_config(base)
    shuffled = describe_config({**base, "sampler": "shuffle"})
    assert "batch 256, " in shuffled and "shuffle batches" in shuffled
    assert "full batch" in describe_config({**base, "batch_size": 0})
    # a redrawn report's title named neither the loss nor the bias the runs trained with
    settings = describe_config({**base, "loss": "dr", "bias": False})
    assert "dr loss" in settings and "no bias" in settings
    assert "loss" not in describe_config(base) and "bias" not in describe_config(base)


def test_a_run_with_extra_classifier_files_is_reused_without_them(tmp_path):
    """`save_classifier` adds files, not results: a finished run made with it is reused by
    the same experiment without it; one made without it cannot serve a command that asks
    for the files."""
    tiny = {"epochs": 2, "eval_every": 1, "feature_dim": 8, "progress": False,
            "dataset_options": {"num_classes": 3, "per_class": 4}}
    out = tmp_path / "exp"
    run_experiment("ufm10", out, seeds=1, methods=["fixed"], report=False,
                   overrides={**tiny, "save_classifier": True})
    metrics = run_dir(out, "fixed", 1) / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    run_experiment("ufm10", out, seeds=1, methods=["fixed"], report=False, overrides=tiny)
    assert metrics.stat().st_mtime_ns == before  # reused, not retrained
    other = tmp_path / "other"
    run_experiment("ufm10", other, seeds=1, methods=["fixed"], report=False, overrides=tiny)
    with pytest.raises(ValueError, match="save_classifier=false \\(now true\\)"):
        run_experiment("ufm10", other, seeds=1, methods=["fixed"], report=False,
                       overrides={**tiny, "save_classifier": True})


def test_the_report_command_pastes_back_into_a_shell(tmp_path, monkeypatch):
    """The command at the top of report.md lost the quotes of a JSON flag: pasted back,
    bash split `{"num_classes":3,...}` and the command failed."""
    import shlex
    import sys

    from gnc.cli import main

    argv = ["experiment", "ufm10", "--dataset-options", '{"num_classes": 3, "per_class": 4}',
            "--feature-dim", "8", "--epochs", "2", "--seeds", "1", "--methods", "fixed",
            "--no-progress", "--out", str(tmp_path / "exp")]
    monkeypatch.setattr(sys, "argv", ["gnc", *argv])
    main(argv)
    text = (tmp_path / "exp" / "report.md").read_text()
    command = text.split("```\n", 2)[1].splitlines()[0]
    assert shlex.split(command) == ["gnc", *argv]


def test_gpu_sized_preset_warns_on_the_cpu(tmp_path, caplog):
    import dataclasses
    import logging

    small = get_preset("ufm10")
    gpu_sized = dataclasses.replace(small, name="big", gpu=True)
    with caplog.at_level(logging.WARNING, logger="gnc.experiments"):
        run_experiment(small, tmp_path / "a", seeds=1, methods=["fixed"], overrides=TINY,
                       report=False)
    assert "sized for a GPU" not in caplog.text
    for device in ("cpu", "auto"):  # auto: the CPU here, without CUDA
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gnc.experiments"):
            run_experiment(gpu_sized, tmp_path / device, seeds=1, methods=["fixed"],
                           overrides={**TINY, "device": device}, report=False)
        assert ("big is sized for a GPU" in caplog.text) == (not torch.cuda.is_available())
    # every paper-sized preset says so; the CPU-sized ones do not
    assert get_preset("cifar10-resnet18").gpu and not get_preset("cifar10-small").gpu
