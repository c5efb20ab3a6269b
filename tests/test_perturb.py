"""Long-tailed training splits, label noise, EMNIST and the released code's transforms."""

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from gnc.config import TrainConfig
from gnc.data import load_dataset
from gnc.data.device import device_images, image_spec
from gnc.data.perturb import RelabelledDataset, long_tailed_counts
from gnc.training import train


def _expected(n_max: int, R: float, K: int) -> list[int]:
    return [math.floor(n_max * R ** (c / (K - 1))) for c in range(K)]


def _npz(tmp_path: Path, K: int = 10, per_class: int = 100, test: bool = True) -> str:
    """x row i holds the value i (so a kept row names its source), balanced labels."""
    n = K * per_class
    y = np.arange(n) % K
    arrays = {"x": np.arange(n, dtype=np.float32)[:, None].repeat(3, 1), "y": y}
    if test:
        arrays |= {"x_test": -np.ones((K, 3), np.float32), "y_test": np.arange(K)}
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


# --------------------------------------------------------------------------- long tail


def test_cifar_long_tail_counts() -> None:
    assert long_tailed_counts([5000] * 10, 0.01) == [5000, 2997, 1796, 1077, 645, 387, 232,
                                                     139, 83, 50]
    c100 = long_tailed_counts([500] * 100, 0.01)
    assert (c100[0], c100[-1], sum(c100)) == (500, 5, 10847)
    assert long_tailed_counts([7, 3, 9], 1.0) == [7, 3, 9]  # R = 1 on unbalanced data: as is


@pytest.mark.parametrize("R", [0.01, 0.1, 0.5])
def test_imbalance_keeps_exactly_the_profile(tmp_path: Path, R: float) -> None:
    K, n = 10, 100
    b = load_dataset(_npz(tmp_path, K, n), imbalance=R, seed=3)
    counts = torch.bincount(b.train_targets, minlength=K).tolist()
    assert counts == _expected(n, R, K)
    x, y = b.train.tensors
    assert torch.equal(y, b.train_targets)
    assert torch.equal(x[:, 0].long() % K, y)  # every kept row is a sample of its class
    assert len(b.test) == K and torch.equal(b.test.tensors[0], -torch.ones(K, 3))
    again = load_dataset(_npz(tmp_path, K, n), imbalance=R, seed=3)
    other = load_dataset(_npz(tmp_path, K, n), imbalance=R, seed=4)
    assert torch.equal(again.train.tensors[0], x)
    assert R == 0.01 or not torch.equal(other.train.tensors[0], x)  # R=0.01: tail too small


def test_imbalance_of_ufm_renumbers_the_free_features() -> None:
    b = load_dataset("ufm", num_classes=10, per_class=100, imbalance=0.01)
    assert torch.bincount(b.train_targets).tolist() == _expected(100, 0.01, 10)
    assert torch.equal(b.train.tensors[0], torch.arange(len(b.train)))  # indices of the table


def test_imbalance_after_subset_and_of_unbalanced_data(tmp_path: Path) -> None:
    b = load_dataset(_npz(tmp_path, 4, 50), subset=20, imbalance=0.25)
    assert torch.bincount(b.train_targets).tolist() == _expected(20, 0.25, 4)
    y = np.repeat(np.arange(3), [5, 40, 8])  # n_max = 40; classes below the profile keep all
    path = tmp_path / "u.npz"
    np.savez(path, x=np.zeros((len(y), 2), np.float32), y=y)
    b = load_dataset(f"npz:{path}", imbalance=0.1)
    assert torch.bincount(b.train_targets).tolist() == [5, min(40, math.floor(40 * 0.1**0.5)), 4]


@pytest.mark.parametrize(("kw", "match"), [
    ({"imbalance": 0.0}, r"`imbalance` in 0 < R <= 1, but got 0.0"),
    ({"imbalance": 1.5}, r"`imbalance` in 0 < R <= 1, but got 1.5"),
    ({"imbalance": math.nan}, r"`imbalance` in 0 < R <= 1"),
    ({"label_noise": -0.1}, r"`label_noise` in 0 <= p <= 1, but got -0.1"),
    ({"label_noise": 2.0}, r"`label_noise` in 0 <= p <= 1"),
    ({"imbalance": 0.001}, r"leaves class\(es\) \[7, 8, 9\] .* with no training sample"),
])
def test_bad_rates_are_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset("ufm", num_classes=10, per_class=100, **kw)


def test_rates_are_any_real_number() -> None:
    """NumPy scalars in range were refused as out of range; a non-number says so."""
    b = load_dataset("ufm", num_classes=4, per_class=20, imbalance=np.float32(0.5),
                     label_noise=np.float64(0.1))
    assert torch.bincount(b.clean_targets).tolist() == [20, 15, 12, 10]  # the long tail
    assert len(b.noisy_indices) == math.floor(0.1 * len(b.train_targets))
    assert len(load_dataset("ufm", num_classes=4, per_class=20, imbalance=np.int64(1)).train) == 80
    with pytest.raises(ValueError, match=r"`imbalance` to be a number in 0 < R <= 1, but got "
                                         r"tensor\(0.5000\)"):
        load_dataset("ufm", num_classes=4, per_class=20, imbalance=torch.tensor(0.5))
    with pytest.raises(ValueError, match="`label_noise` to be a number"):
        load_dataset("ufm", num_classes=4, per_class=20, label_noise=True)


def test_label_noise_that_empties_a_class_is_refused() -> None:
    """As a long tail that leaves a class no sample: re-drawn labels could leave a class
    without any (its class mean undefined, its metrics NaN)."""
    hits = 0
    for seed in range(20):
        try:
            b = load_dataset("ufm", num_classes=10, per_class=2, label_noise=1.0, seed=seed)
        except ValueError as err:
            assert "label noise 1.0 leaves class(es)" in str(err)
            assert "no training label" in str(err)
            hits += 1
        else:
            assert len(torch.unique(b.train_targets)) == 10
    assert 0 < hits < 20  # 20 labels over 10 classes: most draws miss a class, some do not


def test_train_config_checks_the_rates() -> None:
    with pytest.raises(ValueError, match="`imbalance` in 0 < R <= 1"):
        TrainConfig(imbalance=0).validate()
    with pytest.raises(ValueError, match="`label_noise` in 0 <= p <= 1"):
        TrainConfig(label_noise=1.01).validate()
    TrainConfig(imbalance=0.01, label_noise=1.0).validate()


# --------------------------------------------------------------------------- label noise


def test_label_noise_redraws_floor_pN_labels_and_leaves_the_test_split(tmp_path: Path) -> None:
    K, n, p = 10, 100, 0.37
    clean = load_dataset(_npz(tmp_path, K, n))
    b = load_dataset(_npz(tmp_path, K, n), label_noise=p, seed=5)
    N = K * n
    idx = b.noisy_indices
    assert len(idx) == math.floor(p * N) == 370 and len(torch.unique(idx)) == 370
    assert torch.equal(b.clean_targets, clean.train_targets)
    assert torch.equal(b.train.tensors[1], b.train_targets)  # what training reads
    assert torch.equal(b.train.tensors[0], clean.train.tensors[0])  # inputs untouched
    others = torch.ones(N, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(b.train_targets[others], clean.train_targets[others])
    # re-drawn uniformly over all K classes (the old label included, as the released code):
    # about 370·(K−1)/K = 333 change; binomial std ≈ 5.8
    changed = int((b.train_targets != clean.train_targets).sum())
    assert abs(changed - 370 * (K - 1) / K) < 25
    assert torch.equal(b.test.tensors[1], clean.test.tensors[1])
    assert torch.equal(b.test.tensors[0], clean.test.tensors[0])
    again = load_dataset(_npz(tmp_path, K, n), label_noise=p, seed=5)
    assert torch.equal(again.train_targets, b.train_targets)
    assert not torch.equal(load_dataset(_npz(tmp_path, K, n), label_noise=p,
                                        seed=6).noisy_indices, idx)
    none = load_dataset(_npz(tmp_path, K, n), label_noise=0.0)
    assert none.noisy_indices is None and torch.equal(none.train_targets, clean.train_targets)
    assert len(load_dataset(_npz(tmp_path, K, n), label_noise=1.0).noisy_indices) == N


def _png_tree(root: Path, per_class: list[int], size: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split, counts in (("train", per_class), ("test", [2] * len(per_class))):
        for c, n in enumerate(counts):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_long_tail_and_noise_of_images_reach_the_device_path(tmp_path: Path,
                                                             monkeypatch) -> None:
    monkeypatch.setenv("GNC_CACHE_DIR", str(tmp_path / "cache"))
    _png_tree(tmp_path / "img", [12, 12, 12, 12])
    name = f"imagefolder:{tmp_path / 'img'}"
    clean = load_dataset(name, augment=False)
    b = load_dataset(name, augment=False, imbalance=0.25, label_noise=0.5, seed=2)
    assert torch.bincount(b.clean_targets).tolist() == _expected(12, 0.25, 4)
    assert isinstance(b.train, RelabelledDataset)
    assert [int(b.train[i][1]) for i in range(len(b.train))] == b.train_targets.tolist()
    assert len(b.noisy_indices) == math.floor(0.5 * len(b.train))
    images = device_images(b.train, "cpu", cache=False)
    assert torch.equal(images.labels, b.train_targets)  # the noisy labels, not the files'
    full = device_images(clean.train, "cpu", cache=False)
    kept = b.train.dataset.indices  # Subset positions in the clean split
    assert torch.equal(images.pixels, full.pixels[kept])
    assert torch.equal(device_images(b.test, "cpu", cache=False).labels,
                       device_images(clean.test, "cpu", cache=False).labels)


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit", "implicit-nograd"])
def test_long_tailed_training_with_absent_classes(tmp_path: Path, method: str) -> None:
    """R = 0.01 with small shuffled batches: most batches miss the tail classes (one sample
    each), whose running means carry over; every method trains to finite metrics."""
    cfg = TrainConfig(dataset="ufm", dataset_options={"num_classes": 10, "per_class": 100},
                      model="ufm", feature_dim=16, imbalance=0.01, sampler="shuffle",
                      batch_size=16, epochs=2, tau=5.0, method=method, progress=False,
                      eval_test=False)
    row = train(cfg, tmp_path / method)
    assert row["epoch"] == 2 and math.isfinite(row["train_loss"])
    assert all(math.isfinite(row[k]) for k in ("nc1", "top1", "avg_cos_margin"))
    assert row["step"] == 2 * (242 // 16)  # sum of the long-tailed counts, drop_last


# --------------------------------------------------------------------------- EMNIST, transforms


def _idx_files(raw: Path, prefix: str, n: int, num_classes: int, seed: int) -> None:
    """MNIST-format (IDX) image and label files as torchvision reads them."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.uint8)
    (raw / f"{prefix}images-idx3-ubyte").write_bytes(
        struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
    (raw / f"{prefix}labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n)
                                                       + labels.tobytes())


def test_emnist_balanced_from_torchvision_files(tmp_path: Path) -> None:
    raw = tmp_path / "emnist" / "EMNIST" / "raw"
    _idx_files(raw, "emnist-balanced-train-", 94, 47, 0)
    _idx_files(raw, "emnist-balanced-test-", 47, 47, 1)
    b = load_dataset("emnist", data_dir=tmp_path)
    assert (b.num_classes, b.in_shape, len(b.train), len(b.test)) == (47, (1, 28, 28), 94, 47)
    assert b.train[0][0].shape == (1, 28, 28) and len(b.classes) == 47
    r = load_dataset("emnist", data_dir=tmp_path, transforms="released", imbalance=0.5)
    assert r.in_shape == (3, 32, 32) and r.train[0][0].shape == (3, 32, 32)
    assert torch.bincount(r.train_targets).tolist() == _expected(2, 0.5, 47)


def test_released_mnist_transforms(tmp_path: Path) -> None:
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    _idx_files(raw, "train-", 20, 10, 0)
    _idx_files(raw, "t10k-", 10, 10, 1)
    assert load_dataset("mnist", data_dir=tmp_path).in_shape == (1, 28, 28)
    b = load_dataset("mnist", data_dir=tmp_path, transforms="released")
    assert b.in_shape == (3, 32, 32) and b.train[0][0].shape == (3, 32, 32)
    kinds = [type(t) for t in b.train.transform.transforms]
    assert kinds == [T.Grayscale, T.Resize, T.RandomRotation, T.ToTensor, T.Normalize]
    assert b.train.transform.transforms[2].degrees == [-25.0, 25.0]
    assert [type(t) for t in b.test.transform.transforms] == [T.Grayscale, T.Resize,
                                                              T.ToTensor, T.Normalize]
    x, _ = b.test[0]  # grey replicated into three equal channels
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert image_spec(b.train.transform) is None  # the PIL path: the device cannot rotate
    plain = load_dataset("mnist", data_dir=tmp_path, transforms="released", augment=False)
    assert T.RandomRotation not in [type(t) for t in plain.train.transform.transforms]
    with pytest.raises(ValueError, match="unknown transforms 'paper'.*default, released"):
        load_dataset("mnist", data_dir=tmp_path, transforms="paper")
