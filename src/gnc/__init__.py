"""gnc — Guided Neural Collapse.

Classifiers whose last layer is, at every step, the nearest simplex ETF of the current
class-mean features (Markou, Ajanthan & Gould, NeurIPS 2024), with the paper's baselines,
the neural-collapse metrics and the experiments.
"""

from gnc.declarative import NearestETF
from gnc.etf import nearest_etf, polar, simplex_etf

__all__ = ["NearestETF", "nearest_etf", "polar", "simplex_etf"]
__version__ = "0.1.0"
