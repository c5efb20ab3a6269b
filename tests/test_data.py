"""Datasets registry and the stratified (distributed) batch sampler."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from gnc.data import (
    DatasetNotFoundError,
    StratifiedBatchSampler,
    load_dataset,
    make_loader,
    set_loader_epoch,
)

# --------------------------------------------------------------------------- datasets


def test_ufm() -> None:
    b = load_dataset("ufm", num_classes=4, per_class=5)
    assert (b.num_classes, len(b.train), b.in_shape, b.test) == (4, 20, (), None)
    x, y = b.train[7]
    assert x.dtype == torch.long and int(x) == 7 and int(y) == 1
    assert torch.equal(b.train_targets, torch.arange(20) // 5)
    # subset caps per_class (ufm samples are interchangeable)
    assert len(load_dataset("ufm", num_classes=4, subset=3).train) == 12


def test_mnist1d() -> None:
    state = np.random.get_state()
    b = load_dataset("mnist1d")
    assert (b.num_classes, b.in_shape, len(b.train), len(b.test)) == (10, (40,), 4000, 1000)
    x, y = b.train[0]
    assert x.dtype == torch.float32 and 0 <= int(y) < 10
    assert len(b.train_targets) == 4000
    # the generator's global reseeding is undone
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_digits_split_is_stratified_and_seeded() -> None:
    b = load_dataset("digits", seed=3)
    assert (b.num_classes, b.in_shape, len(b.train) + len(b.test)) == (10, (64,), 1797)
    x, _ = b.train[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    train_counts = torch.bincount(b.train_targets)
    test_counts = torch.bincount(torch.stack([y for _, y in b.test]))
    assert ((train_counts - 4 * test_counts).abs() <= 5).all()  # 80/20 in every class
    again = load_dataset("digits", seed=3)
    assert torch.equal(b.train_targets, again.train_targets)
    sub = load_dataset("digits", seed=3, subset=5)
    assert torch.equal(torch.bincount(sub.train_targets), torch.full((10,), 5))
    assert len(sub.train) == 50


def test_npz(tmp_path: Path) -> None:
    path = tmp_path / "toy.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x=rng.normal(size=(12, 3, 4)),
        y=np.arange(12) % 3,
        x_test=rng.normal(size=(6, 3, 4)),
        y_test=np.arange(6) % 3,
    )
    b = load_dataset(f"npz:{path}")
    assert (b.num_classes, b.in_shape, len(b.train), len(b.test)) == (3, (3, 4), 12, 6)
    assert b.train[0][0].dtype == torch.float32
    assert b.name == f"npz:{path}"


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="missing.npz"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros((4, 2)), labels=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"npz file .*bad\.npz must contain arrays 'x' and 'y'"):
        load_dataset(f"npz:{bad}")
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="integer"):
        load_dataset(f"npz:{floats}")
    gap = tmp_path / "gap.npz"
    np.savez(gap, x=np.zeros((4, 2)), y=np.array([0, 2, 0, 2]))
    with pytest.raises(ValueError, match=r"0\.\.K-1"):
        load_dataset(f"npz:{gap}")


def _npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_huge_label_is_an_error_without_allocating_by_label(tmp_path: Path) -> None:
    import tracemalloc

    name = _npz(tmp_path, x=np.zeros((4, 2)), y=np.array([0, 1, 2, 2_000_000]))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"largest label is 2000000 and `y` has only 4"):
            load_dataset(name)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20  # O(N), never O(largest label)


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros(6), "y": np.arange(6) % 2}, r"Expected `x` to have shape \(N, \.\.\.\)"),
    ({"x": np.array([[0.0], [np.nan], [1.0], [2.0]]), "y": np.array([0, 1, 0, 1])},
     "Expected `x` to be finite"),
    ({"x": np.array([["a"], ["b"]]), "y": np.array([0, 1])}, "real numeric array"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 3)),
      "y_test": np.array([0, 1])}, r"`x_test` rows of shape \(2,\) like `x`, but got \(3,\)"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 2)),
      "y_test": np.array([0, 2])}, r"`y_test` labels in the training classes 0\.\.1, but got 2"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((3, 2)),
      "y_test": np.array([0, 1])}, "`x_test` and `y_test` to have the same length"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4, dtype=int)}, "at least 2 classes"),
    ({"x": np.zeros((1, 2)), "y": np.zeros(1, dtype=int)}, "at least 2 samples"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 1])}, r"labels `y` in 0\.\.K-1"),
])
def test_npz_bad_arrays_are_one_clear_error(tmp_path: Path, arrays: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(_npz(tmp_path, **arrays))
    assert "\n" not in str(err.value)


def test_npz_test_split_may_lack_classes(tmp_path: Path) -> None:
    b = load_dataset(_npz(tmp_path, x=np.zeros((6, 2)), y=np.arange(6) % 3,
                          x_test=np.zeros((2, 2)), y_test=np.array([0, 0])))
    assert b.num_classes == 3 and len(b.test) == 2


def test_npz_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_text("not a zip")
    with pytest.raises(ValueError, match="cannot be read as an npz archive"):
        load_dataset(f"npz:{path}")


def test_name_and_option_errors() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'x'; choose from ufm, mnist1d"):
        load_dataset("x")
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("npz")
    with pytest.raises(ValueError, match="does not take option"):
        load_dataset("digits", per_class=3)


@pytest.mark.parametrize("name", ["cifar10", "mnist", "svhn"])
def test_missing_torchvision_set(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / name) in msg and "--download" in msg
    assert "\n" not in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_imagenet_says_it_cannot_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded"):
        load_dataset("imagenet", data_dir=tmp_path, download=True)


def _jpeg_tree(root: Path, classes: list[str], per_class: int, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")


def test_cifar10_from_jpeg_folders(tmp_path: Path) -> None:
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    _jpeg_tree(tmp_path / "cifar10-jpg", classes, per_class=3)
    b = load_dataset("cifar10", data_dir=tmp_path)
    assert (b.num_classes, b.in_shape, len(b.train), len(b.test)) == (10, (3, 32, 32), 30, 20)
    assert b.classes == tuple(classes)
    x, y = b.train[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert torch.equal(b.train_targets, torch.arange(10).repeat_interleave(3))
    loader = make_loader(b, 10, stratified=True)
    xb, yb = next(iter(loader))
    assert xb.shape == (10, 3, 32, 32) and sorted(yb.tolist()) == list(range(10))


def test_imagefolder_with_resize(tmp_path: Path) -> None:
    _jpeg_tree(tmp_path / "mine", ["a", "b"], per_class=2, size=20)
    b = load_dataset(f"imagefolder:{tmp_path / 'mine'}", image_size=16, augment=False)
    assert (b.num_classes, b.in_shape) == (2, (3, 16, 16))
    assert b.train[0][0].shape == (3, 16, 16) and b.test[0][0].shape == (3, 16, 16)
    inferred = load_dataset(f"imagefolder:{tmp_path / 'mine'}")
    assert inferred.in_shape == (3, 20, 20) and inferred.train[0][0].shape == (3, 20, 20)
    with pytest.raises(DatasetNotFoundError, match="nothere"):
        load_dataset(f"imagefolder:{tmp_path / 'nothere'}")


def test_an_imagefolder_test_split_may_lack_a_class(tmp_path: Path) -> None:
    """docs/reliability.md: a test split that lacks a class is not an error (its metrics list
    the class as missing). An imagefolder test split without a class's folder was refused
    ("class folders differ"), and with the folder left empty torchvision refused it; the test
    labels are the training split's classes."""
    import shutil

    from gnc.config import TrainConfig
    from gnc.training import Trainer

    root = tmp_path / "mine"
    _jpeg_tree(root, ["a", "b", "c"], per_class=4, size=8)
    shutil.rmtree(root / "test" / "b")
    b = load_dataset(f"imagefolder:{root}")
    assert b.classes == ("a", "b", "c") and b.test.targets == [0, 0, 2, 2]
    (root / "test" / "b").mkdir()  # an empty folder: the same
    assert load_dataset(f"imagefolder:{root}").test.targets == [0, 0, 2, 2]
    cfg = TrainConfig(dataset=f"imagefolder:{root}", model="mlp", width=8, feature_dim=4,
                      epochs=1, batch_size=6, progress=False)
    row = Trainer(cfg, tmp_path / "run").fit()
    assert row["test_missing_classes"] == [1] and row["missing_classes"] == []
    for c in ("a", "c"):  # no image left: no test split (warned), not one of 0 samples
        shutil.rmtree(root / "test" / c)
    assert load_dataset(f"imagefolder:{root}").test is None
    (root / "test" / "d").mkdir()  # a class the training split lacks: named
    with pytest.raises(ValueError, match=r"class folders \['d'\] of .*test are not training "
                                         r"classes \(the training split has 3: a, b, c\)"):
        load_dataset(f"imagefolder:{root}")
    (root / "test" / "d").rmdir()
    shutil.rmtree(root / "train" / "c")  # an empty training class: the folder is named
    (root / "train" / "c").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"train: .*no valid file for the classes c"):
        load_dataset(f"imagefolder:{root}")


# --------------------------------------------------------------------------- sampler


def _balanced(k: int = 5, per: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.arange(k).repeat_interleave(per)[torch.randperm(k * per, generator=g)]


def _epoch(sampler: StratifiedBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_balanced_batches_cover_epoch() -> None:
    labels = _balanced()
    s = StratifiedBatchSampler(labels, 15, seed=0)
    batches = _epoch(s, 0)
    assert len(s) == len(batches) == 4
    for b in batches:
        assert Counter(labels[b].tolist()) == {c: 3 for c in range(5)}
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(60))


def test_sampler_order_is_seeded_per_epoch() -> None:
    labels = _balanced()
    s = StratifiedBatchSampler(labels, 15, seed=0)
    e0, e1 = _epoch(s, 0), _epoch(s, 1)
    assert e0 != e1
    assert _epoch(s, 0) == e0
    assert _epoch(StratifiedBatchSampler(labels, 15, seed=0), 1) == e1
    assert _epoch(StratifiedBatchSampler(labels, 15, seed=5), 0) != e0


def test_sampler_floor_and_drop_last() -> None:
    labels = _balanced(k=5, per=12)
    s = StratifiedBatchSampler(labels, 17, seed=0)  # 3 per class, 2 left out
    assert all(len(b) == 15 for b in s)
    partial = StratifiedBatchSampler(labels, 25, seed=0, drop_last=False)  # 5 per class
    batches = list(partial)
    assert [len(b) for b in batches] == [25, 25, 10]
    assert sorted(i for b in batches for i in b) == list(range(60))
    assert len(StratifiedBatchSampler(labels, 25, seed=0)) == 2


def test_sampler_imbalanced_uses_smallest_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 7)
    s = StratifiedBatchSampler(labels, 6, seed=0)
    batches = list(s)
    assert len(batches) == 2
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 12
    for b in batches:
        assert Counter(labels[b].tolist()) == {0: 2, 1: 2, 2: 2}


def test_sampler_errors() -> None:
    labels = torch.arange(10).repeat(4)
    with pytest.raises(ValueError, match="batch size 8 is smaller than the number of classes 10"):
        StratifiedBatchSampler(labels, 8)
    with pytest.raises(ValueError, match="does not split evenly over 2 ranks"):
        StratifiedBatchSampler(labels, 30, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        StratifiedBatchSampler(labels, 20, num_replicas=2, rank=2)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_distributed_union_is_single_process_batch(drop_last: bool) -> None:
    labels = _balanced(k=5, per=13)
    single = StratifiedBatchSampler(labels, 20, seed=7, drop_last=drop_last)
    ranks = [
        StratifiedBatchSampler(labels, 20, seed=7, num_replicas=2, rank=r, drop_last=drop_last)
        for r in range(2)
    ]
    for epoch in (0, 3):
        glob = _epoch(single, epoch)
        parts = [_epoch(s, epoch) for s in ranks]
        assert len(parts[0]) == len(parts[1]) == len(ranks[0])
        if drop_last:
            assert len(glob) == len(parts[0]) == 3
        for b, (p0, p1) in enumerate(zip(*parts, strict=True)):
            assert len(p0) == len(p1)
            assert not set(p0) & set(p1)
            assert Counter(labels[p0].tolist()) == Counter(labels[p1].tolist())
            assert sorted(p0 + p1) == sorted(glob[b])
    if not drop_last:
        # 13 = 3·4 + 1: the single process has a last batch of 1 per class; 2 ranks skip it
        assert len(single) == 4 and len(ranks[0]) == 3


def test_make_loader_shard_and_epochs() -> None:
    b = load_dataset("ufm", num_classes=3, per_class=4)
    loader = make_loader(b, 4, shuffle=True, seed=1)
    set_loader_epoch(loader, 0)
    e0 = torch.cat([x for x, _ in loader]).tolist()
    set_loader_epoch(loader, 1)
    e1 = torch.cat([x for x, _ in loader]).tolist()
    assert sorted(e0) == sorted(e1) == list(range(12)) and e0 != e1
    shards = [make_loader(b, 4, num_replicas=2, rank=r) for r in range(2)]
    seen = [torch.cat([x for x, _ in s]).tolist() for s in shards]
    assert sorted(seen[0] + seen[1]) == list(range(12))
    with pytest.raises(ValueError, match="no test split"):
        make_loader(b, 4, split="test")


class _GlobalRngDraws(torch.utils.data.Dataset):
    """A dataset whose items come from torch's global RNG, as torchvision's random transforms do."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.rand(()), i % 2


def test_ranks_of_an_in_process_loader_draw_their_own_augmentations() -> None:
    """With ``num_workers=0`` the transforms draw from torch's global RNG, which every rank of
    a DDP run seeds alike: position i of every rank's batch had the same crop and flip. Each
    rank's epoch now has its own draws, the same again when the epoch is replayed (resume), and
    one process's global RNG is left as it is."""
    labels = torch.arange(16) % 2

    def epoch_draws(rank: int, replicas: int, epoch: int) -> Tensor:
        loader = make_loader(_GlobalRngDraws(), 8, labels=labels, stratified=True, seed=4,
                             num_replicas=replicas, rank=rank)
        torch.manual_seed(0)  # every rank seeds alike (model initialisation)
        set_loader_epoch(loader, epoch)
        return torch.cat([x for x, _ in loader])

    r0, r1 = epoch_draws(0, 2, 0), epoch_draws(1, 2, 0)
    assert not torch.equal(r0, r1)
    assert torch.equal(r0, epoch_draws(0, 2, 0))
    assert not torch.equal(r0, epoch_draws(0, 2, 1))
    torch.manual_seed(0)
    want = torch.rand(16)
    assert torch.equal(epoch_draws(0, 1, 3), want)  # one process: the RNG as seeded


def test_tensor_batch_loader_yields_the_dataloader_batches():
    """In-memory datasets skip per-sample collation; the batches stay the same."""
    from torch.utils.data import DataLoader, TensorDataset

    from gnc.data import StratifiedBatchSampler, make_loader, set_loader_epoch
    from gnc.data.sampler import TensorBatchLoader

    x, y = torch.randn(40, 3), torch.arange(40) % 4
    fast = make_loader(TensorDataset(x, y), 8, labels=y, stratified=True, seed=3)
    assert isinstance(fast, TensorBatchLoader)
    slow = DataLoader(TensorDataset(x, y),
                      batch_sampler=StratifiedBatchSampler(y, 8, seed=3))
    for epoch in (0, 1):
        set_loader_epoch(fast, epoch)
        slow.batch_sampler.set_epoch(epoch)
        got, want = list(fast), list(slow)
        assert len(got) == len(want) == 5
        for (xa, ya), (xb, yb) in zip(got, want, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = make_loader(TensorDataset(x, y), 16)
    assert [len(b[1]) for b in plain] == [16, 16, 8]


def test_sampler_full_batch_holds_every_sample_of_imbalanced_data() -> None:
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 7)
    for batch_size in (21, 100):
        s = StratifiedBatchSampler(labels, batch_size, seed=0)
        assert len(s) == 1
        e0, e1 = _epoch(s, 0), _epoch(s, 1)
        assert sorted(e0[0]) == sorted(e1[0]) == list(range(21)) and e0 != e1
    ranks = [StratifiedBatchSampler(labels, 21, seed=0, num_replicas=3, rank=r)
             for r in range(3)]
    parts = [_epoch(r, 0)[0] for r in ranks]
    assert sorted(sum(parts, [])) == list(range(21)) and {len(p) for p in parts} == {7}
    # 21 on 2 ranks: shards of 11 and 10, which DDP's equal average of the ranks' means
    # weighs 1/22 and 1/20 (a single process: 1/21 each): refused
    with pytest.raises(ValueError, match="full batch of 21 samples does not split evenly "
                                         "over 2 ranks"):
        StratifiedBatchSampler(labels, 21, seed=0, num_replicas=2, rank=0)


def test_sampler_no_batch_is_an_error_at_construction() -> None:
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 7)
    with pytest.raises(ValueError, match=r"smallest class has only 4: .* at most 12, or one of "
                                         r"at least 21 \(the full batch\)"):
        StratifiedBatchSampler(labels, 18)
    assert len(StratifiedBatchSampler(labels, 18, drop_last=False)) == 1


def test_sampler_warns_once_about_a_reduced_batch(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="gnc.data.sampler"):
        s = StratifiedBatchSampler(_balanced(k=5, per=12), 17)
        list(s), list(s)
    warnings = [r for r in caplog.records if r.name == "gnc.data.sampler"]
    assert len(warnings) == 1
    assert "batch size 17" in warnings[0].getMessage()
    assert "hold 15 samples (3 per class)" in warnings[0].getMessage()


def test_loader_full_batch_on_digits_default() -> None:
    # `gnc train --dataset digits` with the full batch (batch size 0 in the config) once gave
    # a loader without batches: digits' classes differ in size.
    b = load_dataset("digits")
    loader = make_loader(b, len(b.train), stratified=True, drop_last=True)
    (x, y), = list(loader)
    assert len(y) == len(b.train)


def test_seeds_do_not_share_their_data_orders():
    """The order of epoch e was seeded by seed + e: seed s at epoch e replayed seed s+1's
    epoch e − 1, so an experiment's seeds trained on one sequence of batches, shifted."""
    from gnc.data import batch_sampler_for

    labels = torch.arange(1000) % 10
    a = StratifiedBatchSampler(labels, 100, seed=1)
    b = StratifiedBatchSampler(labels, 100, seed=2)
    orders = {(seed, e): _epoch(s, e) for seed, s in ((1, a), (2, b)) for e in range(3)}
    assert len({json.dumps(o) for o in orders.values()}) == 6
    shuffled = {}
    for seed in (1, 2, 4):
        s = batch_sampler_for(1000, 100, shuffle=True, seed=seed, drop_last=True)
        for e in range(4):
            s.sampler.set_epoch(e)
            shuffled[seed, e] = json.dumps(list(s))
    assert len(set(shuffled.values())) == 12


@pytest.mark.parametrize(("n", "batch", "ranks"), [(10, 6, 3), (1000, 6, 3), (1001, 8, 4)])
def test_shuffled_training_batches_give_every_rank_as_many_steps(n, batch, ranks):
    """--sampler shuffle under DDP: shards of ceil((N − r)/R) gave rank 0 one step more than
    the others when N mod B > B − R, and the other ranks then waited in DDP's all-reduce
    forever. Training shards are cut to a multiple of R."""
    from gnc.data import batch_sampler_for

    samplers = [batch_sampler_for(n, batch, shuffle=True, drop_last=True, num_replicas=ranks,
                                  rank=r) for r in range(ranks)]
    assert len({len(s) for s in samplers}) == 1
    epochs = [list(s) for s in samplers]
    assert {len(e) for e in epochs} == {len(samplers[0])}
    seen = [i for e in epochs for b in e for i in b]
    assert len(seen) == len(set(seen))  # no sample twice


def test_evaluation_batches_need_no_even_split_over_the_ranks():
    """The default eval_batch_size 1024 on 3 ranks was refused at the trainer's set-up:
    evaluation takes ceil(B/R) a rank, every sample once."""
    from gnc.data import load_dataset, make_loader

    bundle = load_dataset("digits")
    loaders = [make_loader(bundle, 1024, split="test", num_replicas=3, rank=r)
               for r in range(3)]
    seen = sorted(int(i) for loader in loaders for _, y in loader for i in range(len(y)))
    assert len(seen) == len(bundle.test)
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        from gnc.data import batch_sampler_for
        batch_sampler_for(100, 1024, shuffle=True, drop_last=True, num_replicas=3)
