"""The capture-ready training step (gnc.step, ``--graph-step``) on the CPU.

It must equal the eager loop body of ``Trainer.train_epoch`` bitwise (parameters, buffers,
optimiser state, losses), read nothing back from the device (a dispatch mode that raises on
host reads), and GraphedStep's warm-up/capture/replay logic must leave no trace: tested with
a stand-in for ``torch.cuda.graph`` that runs the captured function. The CUDA graph itself
needs a GPU (never run yet)."""

import contextlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gnc.config import TrainConfig
from gnc.data.device import DeviceImageLoader
from gnc.data.sampler import TensorBatchLoader
from gnc.etf import products_only
from gnc.heads import ImplicitETFHead
from gnc.step import GraphedStep, HostReadError, NoHostReads, StaticStep
from gnc.training import Trainer
from gnc.validation import trusted_inputs

METHODS = ("standard", "fixed", "implicit")
OPTIMIZERS = ("sgd", "adam", "adamw", "agd")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GNC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A tiny image folder (3 classes, 8×8 RGB): device-resident, cropped and flipped."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 2)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    return root


def _digits(**kw) -> TrainConfig:
    base = {"dataset": "digits", "dataset_options": {"subset": 600}, "model": "mlp",
            "width": 16, "feature_dim": 12, "epochs": 1, "batch_size": 30, "lr": 0.05,
            "device": "cpu", "progress": False, "seed": 1, "polar_method": "newton_schulz"}
    return TrainConfig(**{**base, **kw})


def _images(root, **kw) -> TrainConfig:
    base = {"dataset": f"imagefolder:{root}", "model": "resnet18", "width": 4,
            "feature_dim": 6, "epochs": 2, "batch_size": 3, "lr": 0.05, "tau": 5.0,
            "data_on_device": "on", "device": "cpu", "progress": False, "seed": 2,
            "schedule": "cosine", "polar_method": "newton_schulz"}
    return TrainConfig(**{**base, **kw})


def _train(cfg, out, graph=None):
    trainer = Trainer(cfg, out)
    if graph is not None:
        trainer.step_graph = graph(trainer)
    try:
        stats = [trainer.train_epoch(None) for _ in range(cfg.epochs)]
    finally:
        trainer.release_lock()
    return trainer, stats


def _assert_same_run(a, b, sa, sb):
    assert a.step == b.step >= 20
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                         strict=True):
        assert torch.equal(x, y), k  # parameters and buffers (BN, U, W, μ_G, counts)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for k, state in oa["state"].items():
        for name, v in state.items():
            w = ob["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, name)
    for x, y in zip(sa, sb, strict=True):
        for key in ("train_loss", "train_batch_top1", "skipped_steps", "polar_residual"):
            assert x.get(key) == y.get(key), key
    if isinstance(a.model.head, ImplicitETFHead):  # replays report the residual too
        assert all("polar_residual" in x for x in sb)
    if hasattr(a.model.head, "num_steps"):
        assert a.model.head.num_steps == b.model.head.num_steps == int(b.model.head.steps)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", METHODS)
def test_tensor_data_step_equals_the_eager_step_bitwise(tmp_path, method, optimizer):
    kw = {"method": method, "optimizer": optimizer, "lr": 1.0 if optimizer == "agd" else 0.05}
    a, sa = _train(_digits(**kw), tmp_path / "eager")
    b, sb = _train(_digits(**kw, graph_step=True), tmp_path / "static")
    assert isinstance(b.train_loader, TensorBatchLoader)
    assert not b.step_graph.capture and b.step_graph.replays == 0
    _assert_same_run(a, b, sa, sb)


@pytest.mark.parametrize("method", METHODS)
def test_device_image_step_equals_the_eager_step_bitwise(tmp_path, images, method):
    """Gather, crop, flip, normalise on the device; BN buffers; two epochs (the plan and the
    scalars copied in place, the lr changed by the schedule)."""
    a, sa = _train(_images(images, method=method), tmp_path / "eager")
    b, sb = _train(_images(images, method=method, graph_step=True), tmp_path / "static")
    assert isinstance(b.train_loader, DeviceImageLoader) and b.train_loader.augment
    _assert_same_run(a, b, sa, sb)


def _stand_in(trainer, products=False):
    """GraphedStep with a stand-in for torch.cuda.graph: the "capture" runs the step (a GPU
    only records it; GraphedStep restores the state after), a "replay" runs the step again
    with the Python-side effects a replay does not have undone (the heads' host step count);
    with ``products`` under products_only, as the captured kernels are."""
    static = StaticStep(trainer.model, trainer.optimizer, trainer.cfg.loss, trainer.device)
    head = trainer.model.head

    def factory(fn):
        fn()
        factory.captures += 1

        def replay():  # a replay runs kernels, not Python: its host-side effects undone
            host = {k: v for k, v in vars(head).items()
                    if k in ("_host_steps", "_residual_seen")}
            with products_only() if products else contextlib.nullcontext():
                fn()
            vars(head).update(host)

        return replay

    factory.captures = 0
    graph = GraphedStep(static, capture=True, graph_factory=factory)
    graph.factory = factory
    return graph


@pytest.mark.parametrize(("method", "amp"), [(m, "none") for m in METHODS]
                         + [("implicit", "bf16")])
def test_graphed_step_with_a_stand_in_capture_equals_the_eager_run(tmp_path, images, method,
                                                                   amp):
    """bf16: the backbone under autocast (no weight-cast cache), as the presets train."""
    a, sa = _train(_images(images, method=method, amp=amp), tmp_path / "eager")
    rng = torch.get_rng_state()
    b, sb = _train(_images(images, method=method, amp=amp, graph_step=True),
                   tmp_path / "graphed", graph=_stand_in)
    assert torch.equal(rng, torch.get_rng_state())  # both runs seed, then draw the same
    graph = b.step_graph
    # step 1 eager, step 2 warms up, captures and replays, every later step replays; the
    # second epoch's plan is copied in place: no second capture
    assert graph.factory.captures == graph.captures == 1 and graph.failed is None
    assert graph.replays == b.step - 1
    _assert_same_run(a, b, sa, sb)


def _storages(trainer, static) -> dict:
    """Every tensor a step reads or writes, by name: (object id, storage address). A CUDA
    graph replays on the addresses it captured, so none may be rebound by a step: the
    parameters, buffers and tensor attributes of every module, the optimiser state, the
    static step's own tensors and the device-resident data."""
    found = {}
    for name, module in trainer.model.named_modules():
        tensors = {**vars(module), **module._parameters, **module._buffers}
        found |= {f"{name}.{k}": v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    for i, state in enumerate(trainer.optimizer.state.values()):
        found |= {f"optimizer.{i}.{k}": v for k, v in state.items()
                  if isinstance(v, torch.Tensor)}
    for owner, obj in (("static", static), ("loader", static.loader),
                       ("images", getattr(static.loader, "images", None))):
        for k, v in vars(obj or object()).items():
            items = v.items() if isinstance(v, dict) else [("", v)]  # e.g. SGD's lr tensors
            found |= {f"{owner}.{k}.{j}": t for j, t in items if isinstance(t, torch.Tensor)}
    return {k: (id(v), v.data_ptr()) for k, v in found.items()}


@pytest.mark.parametrize(("method", "optimizer", "amp"),
                         [("standard", "sgd", "none"), ("fixed", "agd", "none"),
                          ("implicit", "adam", "none"), ("implicit", "adamw", "bf16")])
def test_replays_find_every_tensor_where_the_capture_left_it(tmp_path, images, method,
                                                             optimizer, amp):
    """What the stand-in cannot show by itself: a step that rebinds a tensor (``self.U =
    new`` instead of ``self.U.copy_(new)``) trains the same eagerly, but a real graph would
    go on writing the old storage. Every tensor keeps its object and storage from the
    capture through every replay of both epochs."""
    seen = {}

    def pinned(trainer):
        graph = _stand_in(trainer)
        capture = graph.graph_factory

        def factory(fn):
            replay = capture(fn)
            seen["capture"] = _storages(trainer, graph.static)

            def checked():
                replay()
                assert _storages(trainer, graph.static) == seen["capture"]
                seen["replays"] = seen.get("replays", 0) + 1

            return checked

        graph.graph_factory = factory
        graph.factory = capture
        return graph

    lr = 1.0 if optimizer == "agd" else 0.05
    b, _ = _train(_images(images, method=method, optimizer=optimizer, amp=amp, lr=lr,
                          graph_step=True), tmp_path / "pinned", graph=pinned)
    assert b.step_graph.captures == 1 and seen["replays"] == b.step - 1 >= 10
    assert len(seen["capture"]) > 50  # the walk found the model, not just a few tensors


def test_implicit_replays_of_products_only_kernels_stay_close(tmp_path, images):
    a, _ = _train(_images(images, method="implicit"), tmp_path / "eager")
    b, _ = _train(_images(images, method="implicit", graph_step=True), tmp_path / "graphed",
                  graph=lambda t: _stand_in(t, products=True))
    assert b.step_graph.replays == b.step - 1
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                         strict=True):
        assert torch.allclose(x.double(), y.double(), rtol=0, atol=1e-5), k


def test_a_failed_capture_warns_once_restores_and_trains_on_eagerly(tmp_path, images, caplog):
    def broken(trainer):
        static = StaticStep(trainer.model, trainer.optimizer, trainer.cfg.loss, trainer.device)

        def factory(fn):
            fn()  # a step ran before the capture failed: the state must be restored
            try:  # as torch.cuda.graph does: its exit fails too and hides the cause
                raise RuntimeError("CUDA error: operation not permitted when stream is "
                                   "capturing")
            except RuntimeError:  # torch's exit raises with the implicit context
                raise RuntimeError("CUDA error: operation failed due to a previous error "  # noqa: B904
                                   "during capture")

        return GraphedStep(static, capture=True, graph_factory=factory)

    a, sa = _train(_images(images, method="implicit"), tmp_path / "eager")
    with caplog.at_level(logging.WARNING, logger="gnc.step"):
        b, sb = _train(_images(images, method="implicit", graph_step=True),
                       tmp_path / "broken", graph=broken)
    assert b.step_graph.failed.startswith("RuntimeError: CUDA error: operation not permitted")
    assert "; then RuntimeError: CUDA error: operation failed" in b.step_graph.failed
    assert caplog.text.count("could not be captured") == 1 and b.step_graph.replays == 0
    _assert_same_run(a, b, sa, sb)


@pytest.mark.parametrize(("method", "optimizer"),
                         [("standard", "sgd"), ("fixed", "agd"), ("implicit", "adam"),
                          ("implicit", "sgd"), ("standard", "adamw")])
def test_the_step_reads_nothing_back(tmp_path, images, method, optimizer):
    """Three capture-ready steps (after the eager first) under a dispatch mode that raises
    on every host read and error-checking linalg call (a 0-d tensor passed where torch also
    takes a Python number can be read back: ``_foreach_add_(xs, t)`` without ``alpha``)."""
    trainer = Trainer(_images(images, method=method, graph_step=True, optimizer=optimizer,
                              weight_decay=0.01 if optimizer == "adamw" else 5e-4),
                      tmp_path / "run")
    try:
        static = StaticStep(trainer.model, trainer.optimizer, "ce", trainer.device)
        static.begin_epoch(trainer.train_loader, 0)
        trainer.model.train()
        with trusted_inputs():
            static.eager_step(static.index)
            assert static.ready()
            with NoHostReads():
                for _ in range(3):
                    static.step(static.index)
        assert int(static.index) == 4
    finally:
        trainer.release_lock()


def test_the_dispatch_mode_catches_host_reads():
    t = torch.randn(4, 4)
    spd = t @ t.T + torch.eye(4)
    for read in (lambda: t.sum().item(), lambda: bool(t.sum() > 0), lambda: float(t[0, 0]),
                 lambda: torch.nonzero(t), lambda: torch.linalg.eigh(spd),
                 lambda: torch.linalg.svd(t), lambda: torch.linalg.solve(spd, t),
                 lambda: torch.linalg.cholesky(spd), lambda: torch.linalg.inv(spd),
                 lambda: torch.equal(t, t), lambda: t.to("meta"),
                 lambda: torch.empty(4, 4, device="meta").copy_(t)):
        with pytest.raises(HostReadError), NoHostReads():
            read()
    with NoHostReads():  # the unchecked variants pass
        torch.linalg.cholesky_ex(spd)
        torch.linalg.inv_ex(spd)
        torch.linalg.solve_ex(spd, t)
        (t @ t).add_(1).sum()


def test_the_implicit_first_step_would_read_back(tmp_path):
    """Why the first step is eager: δ = 0 solves with the eigensolver."""
    trainer = Trainer(_digits(method="implicit", graph_step=True), tmp_path / "run")
    try:
        static = StaticStep(trainer.model, trainer.optimizer, "ce", trainer.device)
        static.begin_epoch(trainer.train_loader, 0)
        assert not static.ready()
        trainer.model.train()
        with pytest.raises(HostReadError), trusted_inputs(), NoHostReads():
            static.step(static.index)
    finally:
        trainer.release_lock()


def test_fit_with_graph_step_logs_the_eager_metrics(tmp_path):
    from gnc.training import train

    rows = [train(_digits(method="fixed", epochs=2, **kw), tmp_path / name)
            for name, kw in (("eager", {}), ("static", {"graph_step": True}))]
    for key in ("train_loss", "train_batch_top1", "nc1", "top1", "step"):
        assert rows[0][key] == rows[1][key], key
    assert rows[1]["time_forward_ms"] > 0


@pytest.mark.parametrize(("change", "message"), [
    ({"graph_head": True, "method": "implicit"}, "graph_head"),
    ({"schedule": "onecycle"}, "onecycle"),
    ({"amp": "fp16"}, "fp16"),
    ({"compile": True}, "compile"),
    ({"method": "implicit", "polar_method": "auto"}, "newton_schulz"),
])
def test_validate_refuses_what_the_captured_step_cannot_hold(change, message):
    with pytest.raises(ValueError, match=f"graph_step cannot capture.*{message}"):
        TrainConfig(**{"polar_method": "newton_schulz", "graph_step": True, **change}).validate()
    TrainConfig(graph_step=True, polar_method="newton_schulz").validate()


def test_static_step_refuses_what_it_cannot_run(tmp_path):
    trainer = Trainer(_digits(method="standard"), tmp_path / "run")
    try:
        with pytest.raises(ValueError, match="one process, not 2"):
            StaticStep(trainer.model, trainer.optimizer, "ce", trainer.device, world_size=2)
        opt = torch.optim.RMSprop(trainer.model.parameters())
        with pytest.raises(ValueError, match="not RMSprop"):
            StaticStep(trainer.model, opt, "ce", trainer.device)
        opt = torch.optim.SGD(trainer.model.parameters(), lr=0.1, maximize=True)
        with pytest.raises(ValueError, match="default options"):
            StaticStep(trainer.model, opt, "ce", trainer.device)
    finally:
        trainer.release_lock()


def test_a_stream_of_its_own_needs_a_cuda_device(tmp_path):
    """``GraphedStep(stream=...)`` (several runs' graphs in one process) is CUDA only; the
    default capture is :func:`gnc.step.cuda_graph` on that stream."""
    trainer = Trainer(_digits(method="standard"), tmp_path / "run")
    try:
        static = StaticStep(trainer.model, trainer.optimizer, "ce", trainer.device)
        with pytest.raises(ValueError, match="a stream needs a CUDA device, not cpu"):
            GraphedStep(static, stream=object())
        graph = GraphedStep(static)
        assert graph.stream is None and graph.graph_factory.keywords == {"stream": None}
    finally:
        trainer.release_lock()


def test_no_capture_whose_warm_up_would_run_past_the_epoch(tmp_path, images):
    """Epochs of 3 steps: the warm-up (3 steps) from step 2 of epoch 1 would index past the
    plan (on a GPU a device-side fault); the capture waits for the next epoch's first step."""
    kw = {"method": "standard", "batch_size": 12, "epochs": 8}
    a, sa = _train(_images(images, **kw), tmp_path / "eager")
    b, sb = _train(_images(images, **kw, graph_step=True), tmp_path / "graphed",
                   graph=_stand_in)
    graph = b.step_graph
    assert graph.failed is None and graph.captures == 1
    assert graph.replays == b.step - 3  # epoch 1 ran eagerly; later epochs: capture + replays
    _assert_same_run(a, b, sa, sb)


def test_a_stream_of_its_own_must_be_current_when_it_runs(tmp_path, monkeypatch):
    """The epoch's work besides the replays (``begin_epoch``'s copies and resets, the loop's
    reads of the accumulators) is issued on the current stream, so a run's own stream must be
    the current one at every step: another current stream is refused before anything runs
    (on a GPU it would race with the replays). Streams faked on the CPU: the device check of
    ``GraphedStep(stream=...)`` passed, as on a GPU."""
    trainer = Trainer(_digits(method="standard", graph_step=True), tmp_path / "run")
    try:
        static = StaticStep(trainer.model, trainer.optimizer, "ce", trainer.device)
        graph = GraphedStep(static)
        own, other = object(), object()
        graph.stream = own
        static.begin_epoch(trainer.train_loader, trainer.step)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: other)
        with pytest.raises(ValueError, match="must run with its stream current"):
            graph.run(lambda: None)
        assert static.position == 0 and not static.ready()  # nothing ran
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: own)
        graph.run(lambda: None)  # its stream current: the first (eager) step
        assert static.position == 1 and static.ready()
    finally:
        trainer.release_lock()


def test_a_failed_capture_gives_back_the_callers_stream(monkeypatch):
    """torch.cuda.graph's exit, failing after an error inside the capture, does not switch
    back from its capture stream (torch/cuda/graphs.py: capture_end before the stream
    context's exit): :func:`gnc.step.cuda_graph` does. Stand-ins for the CUDA calls."""
    from gnc import step as step_module

    current = ["caller"]

    class Graph:
        def __init__(self, graph, stream=None):
            pass

        def __enter__(self):
            current[0] = "capture"

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation failed due to a previous error during "
                               "capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", Graph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: current.__setitem__(0, s))

    def fn():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="previous error") as err:
        step_module.cuda_graph(fn)
    assert current[0] == "caller"
    assert step_module.capture_failure(err.value).startswith(
        "RuntimeError: operation not permitted")


def _with_dropout(trainer):
    """The trainer's backbone followed by dropout: a step that draws random numbers."""
    trainer.model.backbone = nn.Sequential(trainer.model.backbone, nn.Dropout(0.2))


@pytest.mark.parametrize(("own_stream", "method"),
                         [(False, "standard"), (True, "standard"), (True, "implicit")])
def test_a_step_that_draws_random_numbers_is_not_captured_beside_other_runs(
        tmp_path, monkeypatch, caplog, own_stream, method):
    """Every CUDA graph of a process reads the generator's seed and offset from one shared
    pair of device tensors, filled as a replay starts: runs replaying on their own streams
    (``--jobs-mode streams``) would draw each other's dropout masks. Such a step runs eagerly
    (one warning); alone, it is captured. Streams faked on the CPU, as above."""
    def graphed(trainer):
        _with_dropout(trainer)
        graph = _stand_in(trainer)
        if own_stream:
            graph.stream = stream
        return graph

    stream = object()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    a, sa = _train(_digits(method=method), tmp_path / "eager",
                   graph=lambda t: _with_dropout(t))
    with caplog.at_level(logging.WARNING, logger="gnc.step"):
        b, sb = _train(_digits(method=method, graph_step=True), tmp_path / "graphed",
                       graph=graphed)
    graph = b.step_graph
    if own_stream:
        assert graph.failed.startswith("NotCapturable: the step draws random numbers (aten::")
        assert caplog.text.count("could not be captured") == 1 and graph.replays == 0
        _assert_same_run(a, b, sa, sb)
    else:  # (the stand-in's replays draw again: no bitwise comparison)
        assert graph.failed is None and graph.replays == b.step - 1
