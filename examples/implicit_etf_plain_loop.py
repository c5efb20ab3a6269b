"""The implicit ETF head in a plain PyTorch training loop (no `gnc train`).

The head replaces the last nn.Linear: at every step its classifier is the simplex ETF nearest
the running class means of the (normalised) features, so only the backbone is trained. After
training, `gnc.measure` reads the neural-collapse metrics at the head's input.

    python examples/implicit_etf_plain_loop.py [--epochs 30]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gnc


def blobs(n_per_class: int, K: int, dim: int, seed: int = 0) -> TensorDataset:
    """K Gaussian clusters in R^dim: a small problem a few epochs solve."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(K, dim, generator=g)
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    K, d = 5, 16
    data = blobs(40, K, dim=20)
    loader = DataLoader(data, batch_size=50, shuffle=True)
    backbone = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, d))
    head = gnc.make_head("implicit", d, K)  # or "standard" (learned), "fixed" (fixed ETF)
    model = gnc.FeatureClassifier(backbone, head, tau=5.0)  # h -> tau·h/‖h‖ -> head
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    for epoch in range(1, args.epochs + 1):
        model.train()
        for x, y in loader:
            logits, _ = model(x, y)  # targets update the head's running class means
            loss = F.cross_entropy(logits, y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            head.after_optimizer_step()  # "standard": unit-norm rows again; ETF heads: nothing
        if epoch % 10 == 0 or epoch == args.epochs:
            # the head is found by itself: the last classifier the forward pass calls
            m = gnc.measure(model, DataLoader(data, batch_size=100))
            print(f"epoch {epoch:3d}  loss {loss.item():.3f}  top1 {m['top1']:5.1f}%  "
                  f"NC1 {m['nc1']:.3g}  NC3 {m['nc3']:.3g}  "
                  f"cos margin {m['avg_cos_margin']:.3f}  ({m['classifier_layer']})")


if __name__ == "__main__":
    main()
