"""Backbones (feature extractors) and the classifier model built on them."""

from .backbones import (
    BACKBONES,
    MLP,
    CNN1d,
    UnconstrainedFeatures,
    VGGFeatures,
    build_backbone,
)
from .classifier import FeatureClassifier
from .norm import without_bn_affine

__all__ = [
    "BACKBONES",
    "MLP",
    "CNN1d",
    "FeatureClassifier",
    "UnconstrainedFeatures",
    "VGGFeatures",
    "build_backbone",
    "without_bn_affine",
]
