"""How well conditioned the implicit head's proximal target C is in real training runs.

The Newton–Schulz polar factor (`--polar-method newton_schulz`) fixes its number of steps from
an assumed lower bound `σ_min(C) >= NS_SAFETY · δ` (gnc.etf). This trains an implicit run of
a preset with that method and records, at every step, `σ_min(C)/δ` (from a float64 SVD
beside the solver, which it does not change) and the iteration's residual max|UᵀU − I|:

    python benchmarks/polar_conditioning.py ufm10 --epochs 300 [--set KEY=VALUE ...]

Prints one line: steps, the smallest σ_min/δ and its 0.1 % / 1 % / 50 % quantiles, the
assumed bound and the largest residual.
"""

import argparse
import tempfile

import numpy as np
import torch

import gnc.declarative as declarative
from gnc.cli import _overrides
from gnc.etf import NS_SAFETY, polar_newton_schulz
from gnc.experiments import PRESETS
from gnc.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    sigma_min, residual = [], []

    def recording(C, ell, **kw):
        sigma_min.append(float(torch.linalg.svdvals(C.double())[-1]))
        ns = polar_newton_schulz(C, ell, **kw)
        residual.append(float(ns.residual))
        return ns

    declarative.polar_newton_schulz = recording  # what NearestETF calls
    cfg = PRESETS[args.preset].train_config(**{  # --set may override any of these
        "method": "implicit", "epochs": args.epochs, "polar_method": "newton_schulz",
        "progress": False, "eval_every": args.epochs, **_overrides(args.set)})
    with tempfile.TemporaryDirectory() as out:
        train(cfg, out)
    r = np.array(sigma_min) / cfg.delta
    q = np.quantile(r, [0.001, 0.01, 0.5])
    print(f"{args.preset} implicit, {args.epochs} epochs, delta={cfg.delta}: {len(r)} steps; "
          f"sigma_min(C)/delta min {r.min():.4f}, quantiles 0.1% {q[0]:.4f} 1% {q[1]:.4f} "
          f"50% {q[2]:.4f} (schedule assumes >= {NS_SAFETY:g}); largest residual "
          f"{max(residual):.2e}")


if __name__ == "__main__":
    main()
