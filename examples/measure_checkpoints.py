"""Neural collapse over the checkpoints of a run trained without gnc.

A torchvision ResNet-18 is trained in a plain loop on tiny random images, saving a checkpoint
per epoch. Then `gnc measure` reads NC1-NC4, margins and the distance to the nearest simplex
ETF at its penultimate layer (the input of `fc`, found by itself) for every checkpoint into a
`metrics.jsonl`, and `gnc report` plots them.

    python examples/measure_checkpoints.py [--out DIR] [--epochs 3]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gnc-measure-"))
    torch.manual_seed(0)

    # tiny data as an npz file (x: N×3×16×16, y: N), the format `--dataset npz:PATH` reads
    K, n = 4, 64
    y = torch.arange(n) % K
    x = torch.randn(n, 3, 16, 16) + 0.5 * y[:, None, None, None]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "data.npz", x=x.numpy(), y=y.numpy())

    # your own training loop: nothing from gnc
    model = torchvision.models.resnet18(num_classes=K)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    (out / "ckpts").mkdir(exist_ok=True)
    for epoch in range(1, args.epochs + 1):
        model.train()
        for i in range(0, n, 16):
            loss = F.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        torch.save({"epoch": epoch, "model": model.state_dict()},
                   out / "ckpts" / f"epoch_{epoch}.pt")

    # every checkpoint, one line each, in a run directory that `gnc report` reads
    run = out / "exp" / "resnet18" / "seed1"
    gnc = [sys.executable, "-m", "gnc"]
    subprocess.run(gnc + ["measure", "--model", "torchvision:resnet18",
                          "--weights", str(out / "ckpts" / "epoch_*.pt"),
                          "--dataset", f"npz:{out / 'data.npz'}", "--device", "cpu",
                          # BN statistics recomputed over the data: after a few steps the
                          # running averages still trail the weights (DESIGN §5)
                          "--eval-stats", "precise", "--out", str(run)], check=True)
    subprocess.run(gnc + ["report", str(out / "exp")], check=True)


if __name__ == "__main__":
    main()
