"""gnc.measure: NC metrics of any model through hooks, and `gnc measure`."""

import json
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gnc.config import TrainConfig
from gnc.data import make_loader
from gnc.measure import WeightsError, find_layers, load_weights, measure
from gnc.metrics import nc_metrics
from gnc.saved_runs import load_run
from gnc.training import train
from tests.test_cli import assert_one_line_error, run_main

# the keys every comparison checks: NCStatistics.compute's floats and the ETF distances
CHECKED = ("nc1", "nc2", "nc2_h", "nc3", "nc4_bias", "ncc_mismatch", "w_equinorm",
           "h_equinorm", "wh_equinorm", "avg_cos_margin", "top1", "top5")


def assert_same_metrics(a: dict, b: dict, keys=None, rel: float = 1e-9) -> None:
    keys = keys or [k for k in a if k in b and isinstance(a[k], float)
                    and not isinstance(b[k], (list, str)) and not k.endswith("_moved")]
    assert keys
    for k in keys:
        x, y = (math.nan if v is None else float(v) for v in (a[k], b[k]))  # null: NaN
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel, abs=1e-12), k


def images(n: int = 40, K: int = 4, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % K


def loader_of(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# --------------------------------------------------------------------------- a gnc run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-epoch implicit-ETF run on digits (MLP with BatchNorm), a checkpoint per epoch."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(dataset="digits", model="mlp", width=16, feature_dim=16, epochs=2,
                      batch_size=200, method="implicit", checkpoint_every=1, progress=False,
                      eval_test=False)
    train(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, {row["epoch"]: row for row in rows}


def test_measure_equals_the_runs_own_evaluation(digits_run):
    run_dir, rows = digits_run
    cfg, model, info = load_run(run_dir, "cpu")
    loader = make_loader(info["bundle"], cfg.eval_batch_size, split="train")
    out = measure(model, loader)
    assert out["classifier_layer"] == "head" and out["features_layer"] == "head:input"
    assert out["eval_stats"] == "running" and out["forward_passes"] == 1
    assert_same_metrics(out, rows[info["epoch"]])
    assert_same_metrics(out, rows[info["epoch"]], keys=CHECKED + ("etf_w_dist", "etf_h_dist"))


def test_cli_measures_every_checkpoint_and_report_plots_them(digits_run, tmp_path, capsys):
    run_dir, rows = digits_run
    out = tmp_path / "exp" / "measured" / "seed1"
    code, err = run_main(["measure", "--model", f"run:{run_dir}", "--weights",
                          str(run_dir / "checkpoints" / "epoch_*.pt"), "--device", "cpu",
                          "--batch-size", "1024", "--out", out], capsys)
    assert code == 0, err
    measured = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in measured] == [1, 2]
    for row in measured:  # epoch by epoch the run's own rows, "moved" distances included
        assert_same_metrics(row, rows[row["epoch"]], keys=CHECKED + (
            "etf_w_dist", "etf_h_dist", "etf_w_moved", "train_top1"))
    assert (out / "DONE").exists() and (out / "cos_margins.npy").exists()
    code, err = run_main(["report", tmp_path / "exp"], capsys)
    assert code == 0, err
    assert (tmp_path / "exp" / "report.md").exists()
    # a second measurement into the same directory is refused
    code, err = run_main(["measure", "--model", f"run:{run_dir}", "--out", out], capsys)
    assert_one_line_error(code, err, "exists")


# --------------------------------------------------------------------------- auto-detection


def manual(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``layer`` in ``model(x)`` (eval mode), by a hand-written hook."""
    seen = []
    handle = layer.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[-1]


@pytest.mark.parametrize("name, layer, size", [
    ("resnet18", "fc", 32), ("vgg11_bn", "classifier.6", 32), ("vit_b_16", "heads.head", 32),
])
def test_auto_detection_finds_the_classifier_of_torchvision_models(name, layer, size):
    opts = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=4, **opts)
    x, y = images(8, size=size)
    found = find_layers(model, x)
    assert (found.features, found.classifier) == (f"{layer}:input", layer)
    fc = model.get_submodule(layer)
    h = manual(model, fc, x)
    torch.testing.assert_close(found.h, h, rtol=0, atol=0)
    torch.testing.assert_close(found.logits, fc(h), rtol=1e-6, atol=1e-6)
    assert not model._forward_hooks and not fc._forward_hooks  # all removed
    if name != "vgg11_bn":  # d = 4096 > N = 8: Σ_T is singular, VCI needs a 4096² eigh (~40 s)
        out = measure(model, loader_of(x, y, 3))
        assert_same_metrics(out, nc_metrics(h, y, fc.weight.detach(), fc.bias.detach()),
                            keys=CHECKED, rel=1e-5)


def test_named_layers_and_a_model_used_in_training_mode():
    model = torchvision.models.resnet18(num_classes=4)
    model.train()
    x, y = images(12)
    out = measure(model, loader_of(x, y, 5), features="avgpool", classifier="fc")
    assert out["features_layer"] == "avgpool" and out["classifier_layer"] == "fc"
    h = manual(model, model.fc, x)
    assert model.training is False
    model.train()
    measure(model, loader_of(x, y, 5))
    assert model.training  # the caller's mode comes back
    ref = nc_metrics(h, y, model.fc.weight.detach(), model.fc.bias.detach())
    assert_same_metrics(out, ref, keys=CHECKED, rel=1e-5)


# --------------------------------------------------------------------------- streaming


def small_net(d: int = 6, K: int = 5) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, d), nn.ReLU(), nn.Linear(d, K)).double()


def test_many_small_batches_equal_one_big_batch_with_and_without_the_cache():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(101, 12, generator=g, dtype=torch.float64), torch.arange(101) % 5
    model = small_net()
    big = measure(model, loader_of(x, y, 101))
    small = measure(model, loader_of(x, y, 4))
    twice = measure(model, loader_of(x, y, 7), max_cache_bytes=0)
    assert big["forward_passes"] == small["forward_passes"] == 1
    assert twice["forward_passes"] == 2
    keys = CHECKED + ("etf_w_dist", "etf_h_dist", "num_samples")
    assert_same_metrics(small, big, keys=keys)
    assert_same_metrics(twice, big, keys=keys)
    torch.testing.assert_close(small["cos_margins"], big["cos_margins"])


def test_feature_dimension_below_the_number_of_classes():
    model = small_net(d=3, K=5)
    x, y = torch.randn(50, 12, dtype=torch.float64), torch.arange(50) % 5
    out = measure(model, loader_of(x, y, 8))
    assert math.isfinite(out["nc1"]) and math.isfinite(out["avg_cos_margin"])
    assert math.isnan(out["etf_w_dist"]) and math.isnan(out["etf_h_dist"])  # no ETF in R^3


def test_precise_statistics_leave_the_callers_model_unchanged():
    model = small_net()
    x, y = torch.randn(60, 12, dtype=torch.float64) + 3.0, torch.arange(60) % 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    running = measure(model, loader_of(x, y, 10))
    precise = measure(model, loader_of(x, y, 10), eval_stats="precise")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert precise["eval_stats"] == "precise" and running["nc1"] != precise["nc1"]
    bn = model[2]  # by hand: BN statistics of the data, then the same measurement
    bn.reset_running_stats()
    bn.momentum = None
    model.train()
    with torch.no_grad():
        for xb, _ in loader_of(x, y, 10):
            model(xb)
    assert_same_metrics(measure(model, loader_of(x, y, 10)), precise, keys=CHECKED)


# --------------------------------------------------------------------------- errors


def test_a_wrong_layer_name_is_one_line():
    model = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(ValueError, match=r"no layer named 'fcc'.*did you mean 'fc'") as err:
        measure(model, loader_of(*images(4), 4), classifier="fcc")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="layer 'layer4.0.relu'.*no 2-D `weight`"):
        measure(model, loader_of(*images(4), 4), classifier="layer4.0.relu")


def test_a_model_without_a_linear_classifier_is_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"no nn.Linear .* Sequential; name the classifier"):
        measure(model, loader_of(*images(4), 4))
    assert not any(m._forward_hooks for m in model.modules())


def test_weights_of_another_model_are_one_line(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "r18.pt")
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in
                torchvision.models.resnet18(num_classes=4).state_dict().items()}},
               tmp_path / "ddp.pt")
    model = torchvision.models.resnet34(num_classes=4)
    with pytest.raises(WeightsError, match=r"do not fit resnet34: key 'layer1.2.conv1.weight'"
                       " of the model is missing from the file"):
        load_weights(model, tmp_path / "r18.pt", name="resnet34")
    other = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(WeightsError, match=r"'fc.weight' has shape \(4, 512\) in the file"):
        load_weights(other, tmp_path / "r18.pt")
    assert load_weights(torchvision.models.resnet18(num_classes=4), tmp_path / "ddp.pt") == 3


def test_weights_that_are_no_values_are_one_line_and_odd_epochs_ignored(tmp_path):
    """Meta or sparse tensors were a traceback from load_state_dict (47 lines of "While
    copying" for meta); integer weights loaded and measured NaN everywhere."""
    model = torchvision.models.resnet18(num_classes=4)
    state = model.state_dict()
    cases = {
        "meta": ({k: v.to("meta") for k, v in state.items()}, "is a meta tensor in the file"),
        "sparse": (state | {"fc.weight": state["fc.weight"].to_sparse()},
                   "'fc.weight' is a torch.sparse_coo tensor in the file"),
        "int": (state | {"fc.weight": state["fc.weight"].long()},
                "'fc.weight' is torch.int64 in the file but torch.float32 in the model"),
    }
    for name, (bad, match) in cases.items():
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(WeightsError, match=match):
            load_weights(model, tmp_path / f"{name}.pt")
    for epoch in (-5, 10**30, 2.0):
        torch.save({"epoch": epoch, "model": state}, tmp_path / "odd.pt")
        assert load_weights(model, tmp_path / "odd.pt") is None


@pytest.fixture
def npz_images(tmp_path):
    x, y = images(12, K=3)
    path = tmp_path / "imgs.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def test_cli_errors_are_one_line(tmp_path, npz_images, capsys):
    other = torchvision.models.mobilenet_v3_small(num_classes=3).state_dict()
    torch.save(other, tmp_path / "other.pt")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "ep_5.pt")
    base = ["measure", "--model", "torchvision:resnet18", "--dataset", f"npz:{npz_images}",
            "--device", "cpu"]
    cases = [
        (["--weights", tmp_path / "other.pt"], "do not fit torchvision:resnet18: key "
         "'conv1.weight' of the model is missing from the file"),
        (["--weights", tmp_path / "ep_5.pt", "--classifier", "head"], "no layer named 'head'"),
        (["--weights", tmp_path / "nothing_*.pt"], "no file matches --weights"),
        ([], "needs --weights"),
        (["--weights", tmp_path / "ep_*.pt", tmp_path / "other.pt", "--out",
          tmp_path / "a.json"], "several checkpoints make several rows"),
        (["--weights", tmp_path / "ep_5.pt", "--split", "test"], "has no test split"),
    ]
    for extra, match in cases:
        code, err = run_main(base + extra, capsys)
        assert_one_line_error(code, err, match)
    code, err = run_main(["measure", "--model", "torchvision:resnet81", "--dataset",
                          f"npz:{npz_images}", "--weights", tmp_path / "ep_5.pt"], capsys)
    assert_one_line_error(code, err, "unknown torchvision model 'resnet81'; did you mean")


def test_cli_one_checkpoint_to_a_json_file(tmp_path, npz_images, capsys):
    model = torchvision.models.resnet18(num_classes=3)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt_7.pt")
    code, err = run_main(["measure", "--model", "torchvision:resnet18", "--dataset",
                          f"npz:{npz_images}", "--weights", tmp_path / "ckpt_7.pt",
                          "--batch-size", "5", "--device", "cpu", "--out",
                          tmp_path / "m.json"], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "m.json").read_text())
    assert row["epoch"] == 7 and row["split"] == "train" and row["classifier_layer"] == "fc"
    x, y = images(12, K=3)
    ref = measure(model, loader_of(x, y, 5))
    assert_same_metrics(row, ref, keys=CHECKED, rel=1e-6)
    assert len(row["cos_margins"]) == 101


def test_a_run_whose_data_moved_is_measured_and_evaluated_with_data_dir(tmp_path, capsys):
    """`gnc measure --model run:RUN --data-dir NEW` read the run's old data_dir anyway (the
    flag applied only with --dataset), and `gnc evaluate` had no way to say where the data
    went."""
    import shutil

    from gnc.measure import measure_files
    from gnc.saved_runs import evaluate_run
    from tests.test_data import _jpeg_tree

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
               "ship", "truck"]
    _jpeg_tree(tmp_path / "old" / "cifar10-jpg", classes, per_class=2)
    cfg = TrainConfig(dataset="cifar10", data_dir=str(tmp_path / "old"), model="mlp", width=8,
                      feature_dim=16, epochs=1, batch_size=20, method="implicit",
                      data_on_device="off", progress=False)
    row = train(cfg, tmp_path / "run")
    shutil.move(tmp_path / "old", tmp_path / "new")
    with pytest.raises(FileNotFoundError, match="old"):
        evaluate_run(tmp_path / "run", device="cpu")
    again = evaluate_run(tmp_path / "run", device="cpu", data_dir=tmp_path / "new")
    assert again["nc1"] == pytest.approx(row["nc1"], rel=1e-6)
    (measured, _), = measure_files(f"run:{tmp_path / 'run'}", data_dir=str(tmp_path / "new"),
                                   device="cpu")
    assert measured["nc1"] == pytest.approx(row["nc1"], rel=1e-6)
    code, err = run_main(["evaluate", tmp_path / "run", "--device", "cpu", "--data-dir",
                          tmp_path / "new"], capsys)
    assert code == 0, err


def test_data_dir_is_refused_for_a_run_on_a_path_dataset(tmp_path):
    """`--data-dir` moves named datasets only: for an `npz:PATH` run it did nothing, and the
    missing file's error followed."""
    from gnc.saved_runs import evaluate_run

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 6)).astype(np.float32),
             y=np.arange(40) % 4)
    cfg = TrainConfig(dataset=f"npz:{tmp_path / 'd.npz'}", model="mlp", width=8, feature_dim=8,
                      epochs=1, batch_size=20, progress=False)
    train(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="is a path of its own"):
        evaluate_run(tmp_path / "run", device="cpu", data_dir=tmp_path)
