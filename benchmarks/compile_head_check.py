"""Does torch.compile keep the gradients of the implicit head's class-mean tracker?

`--compile` compiles the backbone only. The head could be compiled too (with
`--polar-method newton_schulz` dynamo traces it as one graph), but its class-mean tracker
increments buffers (`t`, `counts`) that its differentiable output depends on, a pattern
that AOTAutograd has compiled wrongly. This runs the tracker eagerly and compiled on the same
batches and prints the largest difference of the input gradients per step (0 up to rounding
means the compiled head could be offered):

    python benchmarks/compile_head_check.py [--backend aot_eager|inductor] [--steps 3]
"""

import argparse
import copy

import torch

from gnc.class_means import ClassMeanTracker
from gnc.validation import trusted_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    d, K, B = 64, 10, 40
    eager = ClassMeanTracker(d, K)
    compiled = torch.compile(copy.deepcopy(eager), backend=args.backend)
    y, weights = torch.arange(B) % K, torch.randn(d, K)
    print(f"torch {torch.__version__}, backend {args.backend}")
    for step in range(args.steps):
        x = torch.randn(B, d)
        grads = []
        for tracker in (eager, compiled):
            h = x.clone().requires_grad_()
            with trusted_inputs():
                H_bar, _ = tracker(h, y)
            (H_bar * weights).sum().backward()
            grads.append(h.grad)
        diff = (grads[0] - grads[1]).abs().max().item()
        scale = grads[0].abs().max().item()
        print(f"step {step}: max |grad eager - grad compiled| = {diff:.3e} "
              f"(max |grad| {scale:.3e})")


if __name__ == "__main__":
    main()
