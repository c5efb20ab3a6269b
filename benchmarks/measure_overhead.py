"""What `gnc.measure` costs over one plain forward pass (the issue's target: at most 1.2×).

A torchvision ResNet-18 (random weights, 10 classes) in eval mode over N CIFAR-sized random
images (3×32×32) from an in-memory loader: the plain forward pass (`model(x)` per batch under
no_grad) against `gnc.measure` (hooks, both NCStatistics passes — pass 2 from the cached
features — and every metric). The two alternate `--repeats` times; the table has the median
of each and their ratio.

    python benchmarks/measure_overhead.py [--n 10000] [--batch-size 250] [--repeats 3]
"""

import argparse
import platform
import statistics
import time

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from gnc.measure import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    x, y = torch.randn(args.n, 3, 32, 32), torch.arange(args.n) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    model = torchvision.models.resnet18(num_classes=10).to(device).eval()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        with torch.no_grad():
            for xb, _ in loader:
                model(xb.to(device))
        sync()

    def measured() -> None:
        measure(model, loader, device=device)
        sync()

    plain()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"plain forward": [], "gnc.measure": []}
    for _ in range(args.repeats):
        for name, fn in (("plain forward", plain), ("gnc.measure", measured)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["plain forward"])
    print(f"ResNet-18, {args.n} images 3x32x32, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"median of {args.repeats}")
    print(f"| {'what':<14} | {'time (s)':>9} | {'ratio':>6} |")
    print(f"|{'-' * 16}|{'-' * 10}:|{'-' * 7}:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name:<14} | {t:9.2f} | {t / base:6.3f} |")


if __name__ == "__main__":
    main()
