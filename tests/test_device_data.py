"""Device-resident images (gnc.data.device): same batches, same pixels, right augmentation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from gnc.bench import synthetic_cifar10
from gnc.config import TrainConfig
from gnc.data import StratifiedBatchSampler, load_dataset, make_loader, set_loader_epoch
from gnc.data import device as device_mod
from gnc.data.device import (
    DeviceImageLoader,
    ImageDecodeError,
    crop_flip,
    decode_files,
    device_images,
    image_spec,
)
from gnc.training import Trainer, train


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GNC_CACHE_DIR", str(tmp_path / "cache"))


def _image_folder(root, classes=3, per_class=6, size=(8, 8), fmt="png", seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{fmt}")
    return root


def _pil_batches(bundle, sampler):
    """The PIL path's batches for the index lists of ``sampler``."""
    for idx in sampler:
        xs, ys = zip(*(bundle.train[i] for i in idx), strict=True)
        yield torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_unaugmented_pixels_equal_the_pil_path(tmp_path, fmt):
    root = _image_folder(tmp_path / "imgs", fmt=fmt)
    bundle = load_dataset(f"imagefolder:{root}", augment=False)
    images = device_images(bundle.train, "cpu")
    sampler = StratifiedBatchSampler(bundle.train_targets, 6, seed=3)
    loader = DeviceImageLoader(images, sampler, augment=False)
    set_loader_epoch(loader, 2)
    ours = list(loader)
    sampler.set_epoch(2)
    theirs = list(_pil_batches(bundle, sampler))
    assert len(ours) == len(theirs) == 3  # 6 per class, 2 per class a batch
    for (x, y), (x_pil, y_pil) in zip(ours, theirs, strict=True):
        assert torch.equal(y, y_pil)
        assert torch.equal(x, x_pil)  # bit for bit: same ops, same order


def test_torchvision_arrays_equal_the_pil_path():
    _, plain = synthetic_cifar10(40, 10)  # CIFAR10 datasets: pixels in `.data`, (N, H, W, C)
    ds = plain.train
    images = device_images(ds, "cpu")
    assert images.pixels.shape == (40, 3, 32, 32)
    assert image_spec(ds.transform).crop is None
    batch, labels = next(iter(DeviceImageLoader(images, [list(range(40))], augment=False)))
    assert torch.equal(batch, torch.stack([ds[i][0] for i in range(40)]))
    assert labels.tolist() == [ds[i][1] for i in range(40)]


def test_loader_follows_the_sampler_order_and_is_deterministic():
    train, _ = synthetic_cifar10(60, 10)
    images = device_images(train.train, "cpu")
    sampler = StratifiedBatchSampler(train.train_targets, 20, seed=5)

    def epoch(e, seed=7):
        loader = DeviceImageLoader(images, sampler, augment=True, seed=seed)
        set_loader_epoch(loader, e)
        return list(loader)

    sampler.set_epoch(1)
    order = list(sampler)
    first = epoch(1)
    assert [y.tolist() for _, y in first] == [
        train.train_targets[idx].tolist() for idx in order]
    again = epoch(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    other = epoch(2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_crop_and_flip_match_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 10, 12), generator=g, dtype=torch.uint8)
    oy = torch.randint(0, 5, (16,), generator=g)
    ox = torch.randint(0, 5, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    ours = crop_flip(x, oy, ox, flip, (10, 12), padding=2)
    for b in range(16):
        ref = TF.crop(F.pad(x[b], (2, 2, 2, 2)), int(oy[b]), int(ox[b]), 10, 12)
        ref = TF.hflip(ref) if flip[b] else ref
        assert torch.equal(ours[b], ref)
    assert ours.is_contiguous(memory_format=torch.channels_last)


def test_crop_offsets_and_flips_are_uniform():
    train, _ = synthetic_cifar10(20, 10)
    images = device_images(train.train, "cpu")  # RandomCrop(32, padding=4) + flip
    loader = DeviceImageLoader(images, [list(range(20))], augment=True, seed=1)
    n = 45_000
    oy, ox, flip = loader._draws(n)
    counts = torch.bincount(oy * 9 + ox, minlength=81).double()
    assert counts.numel() == 81 and bool((counts > 0).all())  # every offset in {0..8}²
    expected, sigma = n / 81, (n / 81) ** 0.5
    assert float((counts - expected).abs().max()) < 5 * sigma
    assert abs(float(flip.double().mean()) - 0.5) < 5 * (0.25 / n) ** 0.5


def test_augmented_batch_is_a_crop_of_the_padded_image():
    train, _ = synthetic_cifar10(10, 10)
    images = device_images(train.train, "cpu")
    loader = DeviceImageLoader(images, [list(range(10))], augment=True, seed=4)
    x, _ = next(iter(loader))
    mean = torch.tensor(images.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(images.spec.std).view(1, 3, 1, 1)
    raw = torch.round((x * std + mean) * 255).to(torch.uint8)
    padded = F.pad(images.pixels, (4, 4, 4, 4))
    for b in range(10):
        found = any(
            torch.equal(raw[b], img)
            for i in range(9) for j in range(9)
            for crop in [padded[b, :, i:i + 32, j:j + 32]]
            for img in (crop, crop.flip(-1))
        )
        assert found


def test_decode_cache_is_used_and_never_required(tmp_path, monkeypatch, caplog):
    root = _image_folder(tmp_path / "imgs", classes=2, per_class=3)
    bundle = load_dataset(f"imagefolder:{root}", augment=False)
    first = device_images(bundle.train, "cpu")
    assert list((tmp_path / "cache").glob("images-*.npz"))

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(device_mod, "_decode", no_decoding)
    second = device_images(bundle.train, "cpu")
    assert torch.equal(first.pixels, second.pixels)
    monkeypatch.undo()
    # a cache that cannot be written (a file where the folder should be): a warning, no error
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("GNC_CACHE_DIR", str(blocker / "sub"))
    with caplog.at_level(logging.WARNING):
        third = device_images(bundle.train, "cpu")
    assert torch.equal(first.pixels, third.pixels)
    assert "could not write the image cache" in caplog.text


@pytest.mark.parametrize("damage", ["empty", "truncated", "other images", "object array"])
def test_a_damaged_cache_is_decoded_again_with_a_warning(tmp_path, caplog, damage):
    root = _image_folder(tmp_path / "imgs", classes=2, per_class=3)
    samples = sorted((str(p), int(p.parent.name[-1])) for p in (root / "train").rglob("*.png"))
    pixels, labels = decode_files(samples)
    (cached,) = (tmp_path / "cache").glob("images-*.npz")
    if damage == "empty":
        cached.write_bytes(b"")
    elif damage == "truncated":
        cached.write_bytes(cached.read_bytes()[:100])
    elif damage == "other images":
        np.savez(cached, pixels=pixels[:2], labels=labels)
    else:
        np.savez(cached, pixels=np.array([None] * len(labels), dtype=object), labels=labels)
    with caplog.at_level(logging.WARNING):
        again, _ = decode_files(samples)
    assert np.array_equal(again, pixels)
    assert "image cache" in caplog.text and "decoding again" in caplog.text
    assert np.array_equal(np.load(cached)["pixels"], pixels)  # and written whole again


def test_cache_key_follows_file_content(tmp_path):
    root = _image_folder(tmp_path / "imgs", classes=2, per_class=2)
    samples = sorted((str(p), int(p.parent.name[-1])) for p in (root / "train").rglob("*.png"))
    before, _ = decode_files(samples)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(samples[0][0])
    after, _ = decode_files(samples)
    assert after[0].sum() == 0 and before[0].sum() > 0


def test_bad_image_files_are_one_clear_error(tmp_path):
    root = _image_folder(tmp_path / "imgs", classes=2, per_class=2)
    bad = root / "train" / "class0" / "broken.png"
    bad.write_bytes(b"not an image")
    # the headers are checked at load time (any path), the pixels when decoded (device path)
    with pytest.raises(ImageDecodeError, match="broken.png is not a readable image"):
        load_dataset(f"imagefolder:{root}", augment=False)
    with pytest.raises(ImageDecodeError, match="broken.png is not a readable image"):
        decode_files([(str(bad), 0)], cache=False)
    bad.unlink()
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "train" / "class1" / "odd.png")
    with pytest.raises(ImageDecodeError, match="odd.png is 8x9 pixels.*image_size"):
        load_dataset(f"imagefolder:{root}", augment=False)
    first = root / "train" / "class0" / "0.png"
    with pytest.raises(ImageDecodeError, match="odd.png is 8x9 pixels.*image_size"):
        decode_files([(str(first), 0), (str(root / "train" / "class1" / "odd.png"), 1)],
                     cache=False)


def _image_cfg(root, **kw) -> TrainConfig:
    base = {"dataset": f"imagefolder:{root}", "model": "mlp", "width": 16, "feature_dim": 8,
            "method": "implicit", "epochs": 3, "batch_size": 6, "lr": 0.05, "tau": 5.0,
            "data_on_device": "on", "progress": False, "eval_every": 1,
            "checkpoint_every": 1}
    return TrainConfig.from_dict({**base, **kw})


def test_training_on_device_data_resumes_identically(tmp_path):
    root = _image_folder(tmp_path / "imgs", classes=3, per_class=12)
    full = tmp_path / "full"
    train(_image_cfg(root), full)
    part = tmp_path / "part"
    train(_image_cfg(root, epochs=3), part)
    # cut the run back to epoch 1 and resume it (the first epoch checkpoint as last.pt)
    (part / "checkpoints" / "last.pt").write_bytes(
        (part / "checkpoints" / "epoch_0001.pt").read_bytes())
    train(_image_cfg(root), part, resume=True)
    rows = [[json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (full, part)]
    assert [r["epoch"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["nc1"] == b["nc1"]


def test_device_and_pil_paths_train_alike(tmp_path):
    """Same sampler order, same pixels without augmentation: the same run, on and off."""
    root = _image_folder(tmp_path / "imgs", classes=3, per_class=12)
    rows = {}
    for mode in ("on", "off"):
        row = train(_image_cfg(root, data_on_device=mode, augment=False, checkpoint_every=0),
                    tmp_path / mode)
        rows[mode] = row
    for key in ("train_loss", "top1", "nc1", "test_top1"):
        assert rows["on"][key] == pytest.approx(rows["off"][key], rel=1e-5, abs=1e-6)


def test_data_on_device_is_checked(tmp_path):
    cfg = TrainConfig.from_dict({"dataset": "ufm", "data_on_device": "on", "epochs": 1,
                                 "dataset_options": {"num_classes": 3, "per_class": 4},
                                 "feature_dim": 4, "progress": False})
    with pytest.raises(ValueError, match="holds no images"):
        Trainer(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="data_on_device"):
        TrainConfig(data_on_device="sometimes").validate()


def test_eval_loaders_hold_every_sample(tmp_path):
    root = _image_folder(tmp_path / "imgs", classes=3, per_class=5)
    trainer = Trainer(_image_cfg(root, eval_batch_size=4), tmp_path / "r")
    assert type(trainer.train_loader).__name__ == "DeviceImageLoader"
    ys = torch.cat([y for _, y in trainer.eval_loaders["train"]])
    assert torch.equal(ys, trainer.bundle.train_targets)
    assert sum(len(y) for _, y in trainer.eval_loaders["test"]) == 6
    pil = make_loader(trainer.eval_bundle, 4, split="test")
    for (x, _), (x_pil, _) in zip(trainer.eval_loaders["test"], pil, strict=True):
        assert torch.equal(x, x_pil)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_precise_statistics_leave_training_unchanged(tmp_path, mode):
    """The BN pass of the precise statistics reads augmented training batches (as trained
    on); training must not notice: the losses equal those of the running protocol."""
    root = _image_folder(tmp_path / "imgs", classes=3, per_class=12)
    rows = {}
    for stats in ("precise", "running"):
        cfg = _image_cfg(root, data_on_device=mode, eval_stats=stats, checkpoint_every=0)
        train(cfg, tmp_path / f"{mode}-{stats}")
        rows[stats] = [json.loads(ln)["train_loss"] for ln in
                       (tmp_path / f"{mode}-{stats}" / "metrics.jsonl").read_text().split("\n")
                       if ln]
    assert rows["precise"] == rows["running"]


def test_the_ranks_of_a_ddp_run_draw_different_crops_and_flips():
    """Every rank reseeded its device loader alike: position i of every rank's batch got the
    same crop and flip (a global batch of B held B/R different draws). The rank is part of
    the augmentation seed."""
    from gnc.data import StratifiedBatchSampler, set_loader_epoch
    from gnc.data.device import DeviceImageLoader, DeviceImages, ImageSpec

    n = 40
    labels = torch.arange(n) % 2
    pixels = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8).expand(n, -1, -1, -1)
    spec = ImageSpec((0.5,) * 3, (0.5,) * 3, crop=(8, 8), padding=2, flip=True)
    out = []
    for rank in range(2):
        loader = DeviceImageLoader(
            DeviceImages(pixels, labels, spec),
            StratifiedBatchSampler(labels, 8, seed=1, num_replicas=2, rank=rank),
            augment=True, seed=1)
        set_loader_epoch(loader, 0)
        out.append(torch.cat([x for x, _ in loader]))
    assert not torch.equal(out[0], out[1])
