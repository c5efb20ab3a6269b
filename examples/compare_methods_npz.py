"""The paper's three methods (learned classifier, fixed ETF, implicit ETF) on your own data.

Your data as an npz file (arrays `x`, `y`, optional `x_test`, `y_test`); every method is
trained with the same settings and seeds, then the report compares NC1, NC3, margins and
accuracy (median and range over seeds). The command-line equivalent:

    gnc experiment --dataset npz:data.npz --model mlp --epochs 5 --seeds 2 --out DIR

    python examples/compare_methods_npz.py [--out DIR] [--epochs 5] [--seeds 2]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

from gnc.experiments import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gnc-compare-"))
    out.mkdir(parents=True, exist_ok=True)

    # stand-in data: 4 noisy clusters in R^10 (replace by your own npz file)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 10)) * 2
    y, y_test = np.arange(200) % 4, np.arange(80) % 4
    x = centres[y] + rng.normal(size=(200, 10))
    x_test = centres[y_test] + rng.normal(size=(80, 10))
    data = out / "data.npz"
    np.savez(data, x=x.astype(np.float32), y=y, x_test=x_test.astype(np.float32), y_test=y_test)

    settings = {"dataset": f"npz:{data}", "model": "mlp", "width": 32, "feature_dim": 16,
                "epochs": args.epochs, "batch_size": 48, "lr": 0.05, "tau": 5.0,
                "progress": False}
    run_experiment(None, out / "exp", seeds=args.seeds,
                   methods=["standard", "fixed", "implicit"], overrides=settings)
    report = (out / "exp" / "report.md").read_text()
    print(report[report.index("## Final metrics"):].split("\n## ")[0])


if __name__ == "__main__":
    main()
