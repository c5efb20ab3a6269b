"""Neural-collapse metrics of any PyTorch classifier, read through forward hooks.

Most networks end in a linear classifier ``logits = W h + b`` applied to penultimate-layer
features ``h ∈ R^d``. :func:`measure` finds that layer, reads ``h`` (its input) and the logits
(its output) with forward hooks — the model itself is not changed — and streams them into
:class:`gnc.metrics.NCStatistics`, so every metric of a ``gnc train`` evaluation (NC1–NC4,
equinorms, cosine margins, top-1/top-5, and whatever ``NCStatistics.compute`` adds) comes out
for a torchvision ResNet, VGG, ConvNeXt or ViT as it is. On top it reports the distance of the
classifier and of the class means to their nearest simplex ETF
(:func:`gnc.metrics.etf_distances`).

The rest of the module serves ``gnc measure``: building a model from ``torchvision:NAME`` or
``run:RUN_DIR``, loading weight files (never downloading), and measuring a list of
checkpoints into rows of a ``metrics.jsonl`` that ``gnc report`` reads.
"""

from __future__ import annotations

import difflib
import json
import logging
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gnc.checkpoints import state_dict_mismatch
from gnc.config import EVAL_STATS
from gnc.data import check_split, load_dataset, make_loader
from gnc.evaluation import (
    DEFAULT_CACHE_BYTES,
    etf_distances_of,
    head_weights,
    nc_two_pass,
    quantiles,
    recompute_bn,
    recompute_statistics,
)
from gnc.heads import FixedETFHead, ImplicitETFHead, StandardHead
from gnc.metrics import NCStatistics
from gnc.models.classifier import FeatureClassifier
from gnc.rundir import (
    MAX_COUNT,
    append_metrics,
    mark_done,
    run_lock,
    save_margins,
    write_config,
)
from gnc.runtime import resolve_device
from gnc.saved_runs import load_run

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "Checkpoint",
    "Layers",
    "find_layers",
    "load_weights",
    "measure",
    "measure_geometry",
    "measure_checkpoints",
]

logger = logging.getLogger(__name__)

# Modules that count as "a classifier" when looking for the last one the forward pass uses:
# nn.Linear (torchvision heads) and the heads of gnc (whose W is a parameter or a buffer).
CLASSIFIER_TYPES = (nn.Linear, StandardHead, FixedETFHead, ImplicitETFHead)


# --------------------------------------------------------------------------- layers


def _unknown_layer(name: str, model: nn.Module, role: str) -> ValueError:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else (
        f"its top-level layers are {', '.join(repr(n) for n, _ in model.named_children())}")
    return ValueError(f"{type(model).__name__} has no layer named {name!r} "
                      f"(given as the {role}); {hint}")


def _classifier_weights(module: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """``(W, b)`` of a classifier module: its 2-D ``weight`` and its ``bias`` (0 if None)."""
    W = getattr(module, "weight", None)
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) has no 2-D `weight`, so it "
                         "is not a linear classifier; name one with classifier=...")
    return head_weights(module)


@dataclass
class _Probe:
    """Forward hooks that capture, per forward pass, the features (B×d) and logits (B×K).

    With ``classifier=None`` the first forward pass hooks every :data:`CLASSIFIER_TYPES`
    module and keeps the last one called; the later passes hook only that one.
    """

    model: nn.Module
    features: str | None
    classifier: str | None
    _handles: list = field(default_factory=list)
    _last: tuple | None = None  # (name, inputs, output) of the newest classifier call
    _features: Tensor | None = None  # output of the named features layer

    def __post_init__(self) -> None:
        modules = dict(self.model.named_modules())
        for name, role in ((self.features, "features"), (self.classifier, "classifier")):
            if name is not None and name not in modules:
                raise _unknown_layer(name, self.model, role)
        if self.classifier is not None:
            _classifier_weights(modules[self.classifier], self.classifier)
            self._hook_classifiers({self.classifier: modules[self.classifier]})
        else:
            self._hook_classifiers({n: m for n, m in modules.items()
                                    if isinstance(m, CLASSIFIER_TYPES)})
        if self.features is not None:
            self._hook_features(modules)

    def _hook_classifiers(self, candidates: dict[str, nn.Module]) -> None:
        for name, module in candidates.items():
            def keep_last(module, inputs, output, name=name) -> None:
                # only a reference to the newest call is held: earlier activations are freed
                self._last = (name, inputs, output)
            self._handles.append(module.register_forward_hook(keep_last))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """One forward pass: ``(features (B×d), classifier output (B×K) or None)``.

        Resolves the classifier on the first call (then keeps only its hook).
        """
        self._last, self._features = None, None
        try:
            self.model(x)
        except (RuntimeError, AssertionError) as err:  # shape errors of the model, one line
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"the forward pass of {type(self.model).__name__} failed on a "
                             f"batch of shape {tuple(x.shape)}: {msg}") from err
        model_name = type(self.model).__name__
        if self._last is None and self.classifier is None:
            raise ValueError(f"no nn.Linear (or gnc head) is used by the forward pass of "
                             f"{model_name}; name the classifier with classifier=... (a module "
                             "with a 2-D `weight`)")
        if self._last is None:
            raise ValueError(f"layer {self.classifier!r} was not used by the forward pass of "
                             f"{model_name}")
        name, inputs, output = self._last
        if self.classifier is None:  # first pass: the last classifier called is the one
            self.remove()
            self.classifier = name
            modules = dict(self.model.named_modules())
            _classifier_weights(modules[name], name)
            self._hook_classifiers({name: modules[name]})
            if self.features is not None:
                self._hook_features(modules)
        if self.features is not None:
            if self._features is None:
                raise ValueError(f"layer {self.features!r} was not used by the forward pass "
                                 f"of {model_name}")
            h = self._features.detach().flatten(1)
        else:
            h = inputs[0].detach() if inputs and isinstance(inputs[0], Tensor) else None
            if h is None or h.ndim != 2:
                shape = tuple(h.shape) if h is not None else "no tensor"
                raise ValueError(f"the input of classifier {name!r} has shape {shape}, not "
                                 "(batch, d); name the layers with features=... and "
                                 "classifier=...")
        # a copy: the features are cached for pass 2 and a later in-place op must not move them
        h = h.clone()
        logits = output.detach() if isinstance(output, Tensor) else None
        self._last, self._features = None, None
        return h, logits

    def _hook_features(self, modules: dict[str, nn.Module]) -> None:
        def keep_output(module, inputs, output) -> None:
            if not isinstance(output, Tensor):
                raise ValueError(f"layer {self.features!r} returns a "
                                 f"{type(output).__name__}, not a tensor of features")
            self._features = output
        self._handles.append(modules[self.features].register_forward_hook(keep_output))


class Layers(NamedTuple):
    """What :func:`measure` reads from a model (see :func:`find_layers`)."""

    features: str  # layer whose output are the features, or "<classifier>:input"
    classifier: str  # the classifier layer
    h: Tensor  # (B, d) features of the batch
    logits: Tensor | None  # (B, K) output of the classifier layer (None: not a tensor)


@torch.no_grad()
def find_layers(model: nn.Module, x: Tensor, *, features: str | None = None,
                classifier: str | None = None) -> Layers:
    """The layers :func:`measure` reads and what they give for the batch ``x``: one forward
    pass in eval mode (the model's mode is restored; the hooks are removed).

    Raises:
        ValueError: as :func:`measure` for unknown names or a model without a classifier.
    """
    probe = _Probe(model, features, classifier)
    was_training = model.training
    try:
        model.eval()
        h, logits = probe.run(x)
    finally:
        probe.remove()
        model.train(was_training)
    assert probe.classifier is not None
    return Layers(features or f"{probe.classifier}:input", probe.classifier, h, logits)


# --------------------------------------------------------------------------- measure


def _batches(loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"Expected the loader to yield (inputs, labels) pairs, but got a "
                             f"{type(batch).__name__}")
        yield batch[0], batch[1]


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def measure(
    model: nn.Module,
    loader: Iterable,
    *,
    features: str | None = None,
    classifier: str | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    eval_stats: str = "running",
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> dict[str, Any]:
    r"""Neural-collapse metrics of ``model``'s penultimate layer over ``loader``.

    The classifier is ``logits = W h + b`` with ``W`` (K×d) the classifier layer's ``weight``
    and ``b`` its ``bias`` (0 without one); by default it is the **last** ``nn.Linear`` (or
    gnc head) that the forward pass calls, and the features ``h`` are its input, so
    torchvision ResNets (``fc``), VGGs (``classifier.6``), ConvNeXts (``classifier.2``) and
    ViTs (``heads.head``) work as they are. Both are read by forward hooks, removed on return.
    The metrics are those of ``gnc evaluate``: every key of
    :meth:`gnc.metrics.NCStatistics.compute` (NC1 = tr(Σ_W Σ_B†)/K, NC2, NC3, NC4,
    equinorms, cosine margins, NCC mismatch, top-1/top-5, VCI, numerical rank, …), the
    distances to the nearest simplex ETFs of :func:`gnc.metrics.etf_distances`
    (``etf_w_dist`` = ‖Wᵀ/‖W‖_F − E_W‖_F, ``etf_h_dist`` for the centred class means H,
    ``etf_wh_dist``; ``etf_*_moved`` are NaN here, see :func:`measure_checkpoints`), and
    ``num_samples``, ``forward_passes``, ``features_layer``, ``classifier_layer``,
    ``eval_stats``.

    Two passes as ``NCStatistics`` needs (pass 2 needs the global class means). The features
    and logits of pass 1 are kept where the model computed them while they take at most
    ``max_cache_bytes`` (10,000 × 512 float32 features and 10 logits each are 21 MB), and
    pass 2 reads them: one forward pass over the data in all. Above the limit the loader is
    read and the model run a second time; the loader must then yield the same samples again
    (NCStatistics checks the count). Sums are float64; besides the cache, memory is that of
    ``NCStatistics`` (O(d² + dK), and K·d² for the numerical rank under its budget); any N,
    any d (the ETF distances need d ≥ K and are NaN otherwise).

    Args:
        model: any ``nn.Module`` whose ``model(x)`` calls the classifier (its output is not
            used). A :class:`~gnc.models.FeatureClassifier` is measured at its head, on the
            normalised features, exactly as ``gnc evaluate`` does.
        loader: yields ``(inputs, labels)``, labels in ``[0, K)``.
        features: name (as in ``model.named_modules()``) of the layer whose output,
            flattened to (B, d), are the features; default the classifier's input.
        classifier: name of the classifier layer (a module with a 2-D ``weight``); default
            the last ``nn.Linear`` or gnc head the forward pass calls.
        num_classes: K, to check that the classifier found has K outputs (default: its
            number of outputs).
        device: where the inputs are sent and the statistics live (default: the model's
            device). The model is not moved.
        eval_stats: ``"running"`` (default): the model as given, in eval mode — BatchNorm's
            running statistics and a gnc head's μ_G as stored, what ``model.eval()`` predicts
            and what ``gnc evaluate`` measures. ``"precise"``: first recompute them over one
            pass of ``loader`` (BN: the cumulative average of the batch statistics, only the
            BN layers in training mode; a gnc model: μ_G too, by
            :func:`gnc.evaluation.recompute_statistics`) — one more forward pass. Every
            buffer is restored afterwards: the caller's model is unchanged.
        max_cache_bytes: the pass-1 cache limit (0: always run the model twice).

    Returns:
        The metrics dict (``cos_margins``: the sorted per-sample margins, a CPU tensor).

    Raises:
        ValueError: one line for an unknown layer name, a model without a linear classifier,
            a classifier input that is not (batch, d), features whose d differs from the
            classifier's, ``num_classes`` not matching, labels outside [0, K), an empty
            loader, or a forward pass that fails on the loader's inputs.

    The model is in eval mode during the measurement; its mode is restored on return.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)      # doctest: +SKIP
        >>> metrics = measure(model, loader)                          # doctest: +SKIP
        >>> metrics["nc1"], metrics["classifier_layer"]               # doctest: +SKIP
        (12.3, 'fc')
    """
    out, geometry = measure_geometry(
        model, loader, features=features, classifier=classifier, num_classes=num_classes,
        device=device, eval_stats=eval_stats, max_cache_bytes=max_cache_bytes)
    return out | etf_distances_of(geometry, None)[0]


@torch.no_grad()
def measure_geometry(
    model: nn.Module,
    loader: Iterable,
    *,
    features: str | None = None,
    classifier: str | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    eval_stats: str = "running",
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """:func:`measure` without the ETF distances, and the geometry they come from.

    Returns ``(metrics, geometry)``, ``geometry`` as :func:`gnc.evaluation.evaluate` fills it
    (CPU tensors ``W``, ``b``, ``class_means``, ``global_mean``, ``counts``), for
    :func:`gnc.evaluation.etf_distances_of`.
    """
    if eval_stats not in EVAL_STATS:
        raise ValueError(f"unknown eval_stats {eval_stats!r}; choose from {', '.join(EVAL_STATS)}")
    if max_cache_bytes < 0:
        raise ValueError(f"Expected `max_cache_bytes` >= 0, but got {max_cache_bytes}")
    device = _model_device(model) if device is None else torch.device(device)
    probe = _Probe(model, features, classifier)  # checks the names before any work
    was_training = model.training
    saved = [(b, b.clone()) for b in model.buffers()] if eval_stats == "precise" else []
    try:
        if eval_stats == "precise":
            if isinstance(model, FeatureClassifier):
                recompute_statistics(model, loader, device)
            else:
                model.eval()
                recompute_bn(model, _batches(loader), device)
        model.eval()
        out, geometry = _measure(model, loader, probe, num_classes, device, max_cache_bytes)
        out["eval_stats"] = eval_stats
        return out, geometry
    finally:
        probe.remove()
        for buffer, value in saved:
            buffer.copy_(value)
        model.train(was_training)


def _measure(model: nn.Module, loader: Iterable, probe: _Probe, num_classes: int | None,
             device: torch.device, max_cache_bytes: int) -> tuple[dict, dict]:
    def outputs():
        for x, y in _batches(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            h, logits = probe.run(x)
            yield h, y, logits

    def new_stats(h: Tensor) -> NCStatistics:  # the classifier is known after the first batch
        K, d = classifier()[0].shape
        if h.shape[1] != d:
            raise ValueError(f"the features of layer {probe.features!r} have d={h.shape[1]}, "
                             f"but classifier {probe.classifier!r} takes d={d} inputs")
        if num_classes is not None and num_classes != K:
            raise ValueError(f"Expected classifier {probe.classifier!r} to have "
                             f"num_classes={num_classes} outputs, but it has {K}")
        return NCStatistics(K, d, device=device)

    def classifier() -> tuple[Tensor, Tensor]:
        return _classifier_weights(dict(model.named_modules())[probe.classifier],
                                   probe.classifier)

    out, geometry, passes = nc_two_pass(outputs, new_stats, classifier,
                                        max_cache_bytes=max_cache_bytes)
    out.update(num_samples=int(geometry["counts"].sum()), forward_passes=passes,
               features_layer=probe.features or f"{probe.classifier}:input",
               classifier_layer=probe.classifier)
    return out, geometry


# --------------------------------------------------------------------------- weights


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model (one line)."""


def _state_dict_of(obj: Any) -> dict[str, Tensor] | None:
    """The state dict inside a loaded file: the object itself, or its ``model`` /
    ``state_dict`` entry (gnc checkpoints and the common training-script layouts)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict):
        return None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            return _state_dict_of(obj[key])
    if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return obj
    return None


def _strip_wrappers(state: dict[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """Drop a ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (torch.compile) prefix
    that every key has and the model's keys do not."""
    expected = set(expected)
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not (state.keys() & expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


@dataclass
class Checkpoint:
    """A weights file and the epoch it belongs to."""

    path: Path
    epoch: int


def _read(path: Path) -> Any:
    """``torch.load(weights_only=True)``, whoever wrote the file: a weights file is never
    unpickled in full (gnc's own checkpoints are plain data)."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a plain pickle, whose
            warnings.simplefilter("ignore", UserWarning)  # refusal below says it in one line
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"it refers to {found.group(1)}" if found else "it holds other Python objects"
        raise WeightsError(
            f"cannot read {path} as weights only ({what}); it was not unpickled: save the "
            "model's state_dict()") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise WeightsError(f"cannot read weights {path}: "
                           f"{(str(err).strip() or type(err).__name__).splitlines()[0]}") from None


def load_weights(model: nn.Module, path: str | Path, *, name: str | None = None
                 ) -> int | None:
    """Load the weights file ``path`` into ``model`` (strictly) and return its epoch, if the
    file says (an integer ``epoch`` entry), else None.

    The file is a state dict, or a dict holding one under ``model`` / ``state_dict`` /
    ``model_state_dict`` (a ``module.`` or ``_orig_mod.`` prefix on every key is dropped). It
    is read with ``torch.load(weights_only=True)`` and never unpickled in full, whatever the
    model (a gnc checkpoint is plain data and reads fine).

    Raises:
        WeightsError: one line: the file cannot be read, holds no state dict, or does not fit
            ``model`` (naming the first key that is missing, unexpected or of another shape).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    obj = _read(path)
    state = _state_dict_of(obj)
    if state is None:
        raise WeightsError(f"{path} holds no state dict (a {type(obj).__name__} without "
                           "`model` or `state_dict`)")
    model_state = model.state_dict()
    state = _strip_wrappers(state, model_state)
    problem = state_dict_mismatch(model_state, state)
    if problem:
        raise WeightsError(f"weights {path} do not fit {name or type(model).__name__}: "
                           f"{problem}")
    model.load_state_dict(state)
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    ok = isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch <= MAX_COUNT
    return epoch if ok else None  # else the file name's number, or the file's place


def epoch_from_name(path: str | Path) -> int | None:
    """The last number in the file name's stem (``epoch_0012.pt`` → 12), or None."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


def expand_weights(patterns: Iterable[str]) -> list[Path]:
    """The files that ``patterns`` name (glob patterns expanded, sorted), without repeats.

    Raises:
        WeightsError: a pattern matches no file.
    """
    out: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            p = Path(pattern)
            anchor = Path(p.anchor) if p.is_absolute() else Path()
            rel = str(p.relative_to(anchor)) if p.is_absolute() else pattern
            matches = sorted(q for q in anchor.glob(rel) if q.is_file())
            if not matches:
                raise WeightsError(f"no file matches --weights {pattern!r}")
            out += matches
        else:
            out.append(Path(pattern))
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


# --------------------------------------------------------------------------- models


@dataclass
class MeasuredModel:
    """A model to measure and what ``gnc measure`` knows about it."""

    model: nn.Module
    bundle: Any = None  # a run's dataset (un-augmented), when the model is a gnc run's
    checkpoint_epoch: int | None = None  # the run's newest checkpoint, when loaded


def torchvision_model(name: str, num_classes: int) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=K)``: random weights
    (nothing is downloaded; load weights with :func:`load_weights`)."""
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown torchvision model {name!r}{hint}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def model_from_spec(spec: str, *, num_classes: int | None, device: str = "auto",
                    trust_checkpoint: bool = False,
                    data_dir: str | Path | None = None) -> MeasuredModel:
    """``torchvision:NAME`` (needs ``num_classes``) or ``run:RUN_DIR`` (a gnc run, built from
    its ``config.json`` and newest checkpoint by :func:`gnc.saved_runs.load_run`;
    ``trust_checkpoint`` lets a checkpoint of an older gnc be unpickled in full;
    ``data_dir``: the run's data read from there instead of its own ``data_dir``)."""
    kind, _, rest = spec.partition(":")
    if kind == "torchvision" and rest:
        if num_classes is None:
            raise ValueError("torchvision models need the number of classes (from --dataset)")
        return MeasuredModel(torchvision_model(rest, num_classes))
    if kind == "run" and rest:
        _, model, info = load_run(rest, device, action="measure",
                                  trust_checkpoint=trust_checkpoint, data_dir=data_dir)
        return MeasuredModel(model, info["bundle"], info["epoch"])
    raise ValueError(f"Expected --model to be torchvision:NAME or run:RUN_DIR, but got {spec!r}")


def measure_checkpoints(model: nn.Module, loader: Iterable, weights: list[Path], *,
                        name: str | None = None,
                        **measure_kwargs: Any) -> Iterator[tuple[Checkpoint, dict]]:
    """:func:`measure` of ``model`` with each weights file in turn, in epoch order.

    The epoch of a file is the ``epoch`` it holds, else the last number in its name, else
    its index in ``weights``. Every file is checked against the model before any
    measurement, so a wrong file fails fast. ``etf_w_moved`` / ``etf_h_moved`` measure how
    far the nearest ETFs moved since the previous checkpoint (NaN for the first), as in
    training logs. Yields ``(checkpoint, metrics)``; the model keeps the last file's weights.
    """
    checkpoints = []
    for i, path in enumerate(weights):
        epoch = load_weights(model, path, name=name)
        if epoch is None:
            epoch = epoch_from_name(path)
        checkpoints.append(Checkpoint(Path(path), i if epoch is None else epoch))
    checkpoints.sort(key=lambda c: c.epoch)
    epochs = [c.epoch for c in checkpoints]
    if len(set(epochs)) != len(epochs):
        logger.warning("several weights files share an epoch (%s): the report keeps the last",
                       epochs)
    state: dict | None = None
    for ckpt in checkpoints:
        if len(checkpoints) > 1:  # the single file is loaded already
            load_weights(model, ckpt.path, name=name)
        metrics, geometry = measure_geometry(model, loader, **measure_kwargs)
        distances, state = etf_distances_of(geometry, state)
        yield ckpt, metrics | distances


# --------------------------------------------------------------------------- gnc measure

# keys of a row that describe the measurement rather than a metric (never prefixed)
ROW_META = ("epoch", "split", "checkpoint", "eval_stats", "features_layer", "classifier_layer",
            "num_samples", "forward_passes")


def measure_files(model_spec: str, weights: list[str] | None = None, *,
                  dataset: str | None = None, data_dir: str | None = None, split: str = "train",
                  batch_size: int = 256, device: str = "auto", eval_stats: str = "running",
                  features: str | None = None, classifier: str | None = None,
                  num_workers: int = 0, trust_checkpoint: bool = False
                  ) -> Iterator[tuple[dict, Tensor]]:
    """``gnc measure``: the rows of each checkpoint, in epoch order, and its sorted margins.

    Args:
        model_spec: ``torchvision:NAME`` (``get_model(NAME, weights=None, num_classes=K)``,
            K of the dataset; needs ``weights``) or ``run:RUN_DIR`` (a gnc run: its model,
            dataset and, without ``weights``, its newest checkpoint).
        weights: weights files or glob patterns (read from files only, never downloaded).
        dataset: a :func:`gnc.data.load_dataset` name (``npz:PATH``, ``imagefolder:PATH``,
            ``cifar10``, …), read from ``data_dir`` (default ``data``) without augmentation;
            default for a run: its own, from ``data_dir`` when given, else from the run's.
        split: ``train`` or ``test``.
        batch_size, num_workers: of the (unshuffled) loader.
        device, eval_stats, features, classifier: as :func:`measure`.
        trust_checkpoint: a ``run:RUN_DIR`` whose newest checkpoint is of an older gnc may
            be unpickled in full (``--trust-checkpoint``); files of ``weights`` never are.

    Yields ``(row, sorted cos margins)``; a row is ``epoch``, ``split``, ``checkpoint`` and
    every metric of :func:`measure_checkpoints` except ``cos_margins``, which it holds as
    101 quantiles (:func:`gnc.evaluation.quantiles`).
    """
    check_split(split)
    if batch_size < 1:
        raise ValueError(f"Expected --batch-size >= 1, but got {batch_size}")
    paths = expand_weights(weights or [])
    bundle = None
    if dataset is not None:
        bundle = load_dataset(dataset, data_dir=data_dir or "data", augment=False)
    elif not model_spec.startswith("run:"):
        raise ValueError(f"--model {model_spec} needs --dataset (only a run:RUN_DIR model "
                         "brings its own)")
    if model_spec.startswith("torchvision:") and not paths:
        raise ValueError("--model torchvision:NAME needs --weights (weights are read from "
                         "files only, never downloaded)")
    dev = resolve_device(device)
    measured = model_from_spec(model_spec, num_classes=bundle.num_classes if bundle else None,
                               device=str(dev), trust_checkpoint=trust_checkpoint,
                               data_dir=data_dir if dataset is None else None)
    bundle = bundle or measured.bundle
    model = measured.model.to(dev)
    loader = make_loader(bundle, batch_size, split=split, num_workers=num_workers)
    kwargs = {"features": features, "classifier": classifier, "device": dev,
              "eval_stats": eval_stats}
    if paths:
        results = measure_checkpoints(model, loader, paths, name=model_spec, **kwargs)
    else:  # a run's newest checkpoint, loaded by model_from_spec
        metrics, geometry = measure_geometry(model, loader, **kwargs)
        last = Checkpoint(Path(model_spec[len("run:"):]) / "checkpoints",
                          measured.checkpoint_epoch or 0)
        results = iter([(last, metrics | etf_distances_of(geometry, None)[0])])
    for ckpt, metrics in results:
        margins = metrics.pop("cos_margins")
        row = {"epoch": ckpt.epoch, "split": split, "checkpoint": str(ckpt.path), **metrics,
               "cos_margins": quantiles(margins)}
        yield row, margins


def report_row(row: dict) -> dict:
    """A row of :func:`measure_files` in the layout of a training run's ``metrics.jsonl``
    (what ``gnc report`` plots): a train split's metrics as they are plus ``train_top1``; a
    test split's prefixed ``test_``."""
    if row["split"] == "train":
        return {**row, "train_top1": row["top1"]}
    return {k if k in ROW_META else f"test_{k}": v for k, v in row.items()}


def write_measure_dir(out: str | Path, rows: Iterable[tuple[dict, Tensor]], config: dict, *,
                      overwrite: bool = False) -> Path:
    """Write the rows as a run directory ``gnc report`` reads (at ``EXP/<name>/seed<k>/``):
    ``config.json``, ``metrics.jsonl`` (one :func:`report_row` per checkpoint, appended as
    each is measured), ``cos_margins.npy`` (the last checkpoint's sorted margins) and
    ``DONE``. Refuses a directory that holds any of these (a training run's, an earlier
    measurement, a file of yours) unless ``overwrite``; only the ``config.json`` of an
    unfinished measurement alone is replaced. Holds :func:`gnc.rundir.run_lock` on the
    directory while writing. Returns the directory."""
    out = Path(out)
    with run_lock(out):
        held = [name for name in MEASURE_FILES if (out / name).exists()]
        if held == ["config.json"] and _is_measure_config(out / "config.json"):
            held = []  # an interrupted measurement's own config.json
        if held and not overwrite:
            raise FileExistsError(f"{out / held[0]} exists (a run's, an earlier measurement "
                                  "or yours); choose another --out or pass --overwrite")
        for name in ("metrics.jsonl", "DONE"):
            (out / name).unlink(missing_ok=True)
        write_config(out, config)
        last = None
        for row, margins in rows:
            append_metrics(out, report_row(row))
            last = margins
        if last is not None:
            save_margins(out, last.numpy())
        mark_done(out, "measured")
    return out


MEASURE_FILES = ("metrics.jsonl", "config.json", "DONE", "cos_margins.npy")


def _is_measure_config(path: Path) -> bool:
    """Whether ``path`` is the ``config.json`` :func:`write_measure_dir` writes."""
    if not path.is_file():  # a FIFO would block the read
        return False
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "measure" in config and config.get("method") == "measured"
