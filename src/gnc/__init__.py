"""gnc — Guided Neural Collapse.

Classifiers whose last layer is, at every step, the nearest simplex ETF of the current
class-mean features (Markou, Ajanthan & Gould, NeurIPS 2024), with the paper's baselines,
the neural-collapse metrics and the experiments.
"""

from gnc.class_means import ClassMeanTracker
from gnc.declarative import NearestETF
from gnc.etf import nearest_etf, polar, simplex_etf
from gnc.heads import FixedETFHead, ImplicitETFHead, StandardHead, make_head
from gnc.measure import measure  # shadows the module on the package: helpers from gnc.measure
from gnc.metrics import NCStatistics, etf_distances, nc_metrics
from gnc.models.classifier import FeatureClassifier

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
