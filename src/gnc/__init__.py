"""gnc — Guided Neural Collapse.

Classifiers whose last layer is, at every step, the nearest simplex ETF of the current
class-mean features (Markou, Ajanthan & Gould, NeurIPS 2024), with the paper's baselines,
the neural-collapse metrics and the experiments.

The public names below are imported on first use (PEP 562), so that ``import gnc.etf`` loads
the mathematical core only, and ``gnc --help`` no torch at all. ``gnc.measure`` is the module
:mod:`gnc.measure`, and calling it calls its function :func:`gnc.measure.measure`:
``gnc.measure(model, loader)``, ``import gnc.measure as m`` and
``from gnc.measure import measure`` all work.
"""

import importlib
import sys
import types

# public name -> the module that defines it
_EXPORTS = {
    "ClassMeanTracker": "gnc.class_means",
    "FeatureClassifier": "gnc.models.classifier",
    "FixedETFHead": "gnc.heads",
    "ImplicitETFHead": "gnc.heads",
    "NCStatistics": "gnc.metrics",
    "NearestETF": "gnc.declarative",
    "StandardHead": "gnc.heads",
    "etf_distances": "gnc.metrics",
    "make_head": "gnc.heads",
    "measure": "gnc.measure",  # the module itself, callable
    "nc_metrics": "gnc.metrics",
    "nearest_etf": "gnc.declarative",
    "polar": "gnc.etf",
    "simplex_etf": "gnc.etf",
}

__all__ = [
    "ClassMeanTracker",
    "FeatureClassifier",
    "FixedETFHead",
    "ImplicitETFHead",
    "NCStatistics",
    "NearestETF",
    "StandardHead",
    "etf_distances",
    "make_head",
    "measure",
    "nc_metrics",
    "nearest_etf",
    "polar",
    "simplex_etf",
]
__version__ = "0.1.0"


class _MeasureModule(types.ModuleType):
    """:mod:`gnc.measure`, callable: ``gnc.measure(model, loader, ...)`` is
    ``gnc.measure.measure(model, loader, ...)``."""

    def __call__(self, *args, **kwargs):
        return self.measure(*args, **kwargs)


class _Package(types.ModuleType):
    """The ``gnc`` package: makes :mod:`gnc.measure` callable when it is imported (whatever
    imports it, the import system then sets it as the attribute ``measure`` of ``gnc``)."""

    def __setattr__(self, name, value):
        if name == "measure" and type(value) is types.ModuleType:
            value.__class__ = _MeasureModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "measure" else getattr(module, name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
