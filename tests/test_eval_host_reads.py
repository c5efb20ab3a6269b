"""The evaluation reads nothing back from the device per batch (issue 18, item 1).

On a GPU each host read (``.item()``, ``int(t)``, ``.tolist()``, a boolean mask, ``nonzero``,
``unique``, ``bincount``, a ``linalg`` error check) waits for every queued kernel: one per
batch serialises the evaluation. On the CPU the same calls are visible to a
``TorchDispatchMode`` (the ops) and to wrappers of the ``Tensor`` methods that copy to the
host; the number of host reads of one evaluation must not grow with the number of batches.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnc import metrics as metrics_module
from gnc.config import TrainConfig
from gnc.evaluation import nc_two_pass
from gnc.metrics import NCStatistics
from gnc.training import Trainer
from gnc.validation import NonFiniteError, trusted_inputs

aten = torch.ops.aten
# ops that read a value back (or size their output from values: a sync on a GPU)
READ_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default,
    aten.unique_dim.default, aten._unique.default, aten._unique2.default,
    aten.unique_consecutive.default, aten.bincount.default, aten.repeat_interleave.Tensor,
    # linalg calls whose error check reads ``info`` back (the ``_ex`` variants do not)
    aten._linalg_eigh.default, aten._linalg_svd.default, aten.linalg_cholesky.default,
}
READ_METHODS = ("tolist", "numpy", "cpu")  # copies to the host (a no-op op on the CPU)


class HostReads(TorchDispatchMode):
    """Counts the host reads made while active, with where they come from (a gnc line)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()
        self._saved: dict = {}

    @property
    def n(self) -> int:
        return sum(self.where.values())

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/gnc/" in f.filename]
        line = f"{frames[-1].filename.split('/gnc/')[-1]}:{frames[-1].lineno}" if frames else "?"
        self.where[f"{what} {line}"] += 1

    def __enter__(self):
        for name in READ_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited
            original = getattr(torch.Tensor, name)

            def wrapped(t, *args, _original=original, _name=name, **kwargs):
                self._record(_name)
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mask_index = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) \
            and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                    for i in args[1] if i is not None)
        if func in READ_OPS or mask_index:
            self._record(str(func))
        return func(*args, **kwargs)


K, D, N = 5, 8, 200


def _data(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % K
    y = y[torch.randperm(N, generator=g)]
    h = (3 * torch.randn(K, D, generator=g))[y] + torch.randn(N, D, generator=g)
    W = torch.randn(K, D, generator=g)
    b = torch.randn(K, generator=g)
    return {"h": h, "y": y, "W": W, "b": b, "logits": h @ W.T + b + torch.randn(N, K,
                                                                               generator=g)}


def _two_pass(data: dict, batches: int, logits: bool, cache: bool):
    def outputs():
        for idx in torch.arange(N).chunk(batches):
            yield data["h"][idx], data["y"][idx], data["logits"][idx] if logits else None

    return nc_two_pass(outputs, lambda h: NCStatistics(K, h.shape[1]),
                       lambda: (data["W"], data["b"]), max_cache_bytes=2**30 if cache else 0)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "model-twice"])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "no-logits"])
def test_nc_two_pass_host_reads_do_not_grow_with_the_batches(cache, logits):
    data = _data()
    results, reads = {}, {}
    for batches in (2, 20):
        counter = HostReads()
        with counter:
            results[batches], _, passes = _two_pass(data, batches, logits, cache)
        reads[batches] = counter.where
        assert passes == (1 if cache else 2)
    assert reads[2] == reads[20], (reads[2], reads[20])
    for key, value in results[2].items():
        if isinstance(value, float):
            assert value == pytest.approx(results[20][key], rel=1e-9, abs=1e-12), key
    torch.testing.assert_close(results[2]["cos_margins"], results[20]["cos_margins"])


def test_the_passes_read_nothing_per_batch():
    """Inside ``trusted_inputs`` pass 1 reads nothing; pass 2 reads twice (the class sizes
    of the per-class second moments when pass 1 ends, and N for the means), once each."""
    data = _data()
    h, y, W, b = (data[k] for k in ("h", "y", "W", "b"))
    stats = NCStatistics(K, D)
    with trusted_inputs():
        with HostReads() as counter:
            for idx in torch.arange(N).chunk(20):
                stats.update(h[idx], y[idx], data["logits"][idx])
        assert counter.n == 0, counter.where
        with HostReads() as counter:
            for idx in torch.arange(N).chunk(20):
                stats.update_margins(h[idx], y[idx], W, b)
        assert counter.n == 2, counter.where
    assert stats.compute(W, b)["top1"] > 0


def test_outside_trusted_inputs_the_checks_read_per_batch():
    # the API default: every call checks its values at once (what the deferral replaces)
    data = _data()
    stats = NCStatistics(K, D)
    with HostReads() as counter:
        for idx in torch.arange(N).chunk(20):
            stats.update(data["h"][idx], data["y"][idx])
    assert counter.n >= 20


def test_the_per_class_moments_flush_once_per_budget(monkeypatch):
    data = _data()
    monkeypatch.setattr(metrics_module, "PENDING_BYTES", 10 * D * 4)  # 10 float32 rows
    stats = NCStatistics(K, D)
    with trusted_inputs(), HostReads() as counter:
        for idx in torch.arange(N).chunk(20):
            stats.update(data["h"][idx], data["y"][idx])
    assert counter.n == 20, counter.where  # one read per flush, the flushes by the budget
    reference = NCStatistics(K, D)
    reference.update(data["h"], data["y"])
    stats.sync()
    reference.sync()
    torch.testing.assert_close(stats._global.class_moments, reference._global.class_moments,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("spoil", "error", "match"), [
    (lambda d: d["h"].__setitem__((17, 3), float("nan")), NonFiniteError, "`features` to be"),
    (lambda d: d["logits"].__setitem__((150, 0), float("inf")), NonFiniteError, "`logits`"),
    (lambda d: d["y"].__setitem__(slice(40, 43), K), ValueError,
     r"`labels` to be in \[0, K=5\), but got 3 outside it"),
    (lambda d: d["y"].__setitem__(99, -1), ValueError, r"but got 1 outside it"),
    (lambda d: d["W"].__setitem__((0, 0), float("nan")), NonFiniteError, "`W` and `b`"),
])
def test_deferred_checks_raise_at_the_end(spoil, error, match):
    data = _data()
    spoil(data)
    with pytest.raises(error, match=match):
        _two_pass(data, 20, logits=True, cache=True)


def _trainer(tmp_path, eval_batch_size: int) -> Trainer:
    cfg = TrainConfig.from_dict({
        "dataset": "ufm", "dataset_options": {"num_classes": 4, "per_class": 30},
        "model": "ufm", "feature_dim": 8, "epochs": 2, "batch_size": 8, "lr": 0.5,
        "tau": 5.0, "weight_decay": 0.0, "progress": False, "eval_test": False,
        "method": "implicit", "eval_batch_size": eval_batch_size})
    return Trainer(cfg, tmp_path / f"r{eval_batch_size}")


def test_trainer_evaluation_host_reads_do_not_grow_with_the_batches(tmp_path):
    reads, rows = {}, {}
    for eval_batch_size in (60, 4):  # 2 and 30 batches of the 120 samples
        trainer = _trainer(tmp_path, eval_batch_size)
        assert len(trainer.eval_loaders["train"]) == 120 // eval_batch_size
        trainer.train_epoch(None)
        with HostReads() as counter:
            rows[eval_batch_size] = trainer.evaluate_epoch({})
        reads[eval_batch_size] = counter.where
    assert reads[60] == reads[4], (reads[60], reads[4])
    assert rows[60]["nc1"] == pytest.approx(rows[4]["nc1"], rel=1e-6)
