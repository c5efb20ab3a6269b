"""Does torch.compile keep the gradients of the implicit head's class-mean tracker?

`--compile` compiles the backbone only. The head could be compiled too (with
`--polar-method newton_schulz` dynamo traces it as one graph), but its class-mean tracker
increments buffers (`t`, `counts`) that its differentiable output depends on, a pattern
that AOTAutograd has compiled wrongly. `ClassMeanTracker.forward` therefore runs its update
eagerly when it is being compiled. This compares, on the same batches, the input gradients
of the eager tracker with (a) the update itself compiled (`ClassMeanTracker._update`: what
lifting that guard would run; 0 up to rounding means the guard could go) and (b) the tracker
module compiled as a user would (the guard: must be 0), and prints the largest differences:

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
    update = torch.compile(ClassMeanTracker._update, backend=args.backend)
    by_update, module = copy.deepcopy(eager), torch.compile(copy.deepcopy(eager),
                                                            backend=args.backend)
    trackers = {"eager": eager,
                "update compiled": lambda h, y: update(by_update, h, y),
                "module compiled": module}
    y, weights = torch.arange(B) % K, torch.randn(d, K)
    print(f"torch {torch.__version__}, backend {args.backend}")
    for step in range(args.steps):
        x = torch.randn(B, d)
        grads = {}
        for name, tracker in trackers.items():
            h = x.clone().requires_grad_()
            with trusted_inputs():
                H_bar, _ = tracker(h, y)
            (H_bar * weights).sum().backward()
            grads[name] = h.grad
        diffs = ", ".join(f"{name} {(grads['eager'] - g).abs().max().item():.3e}"
                          for name, g in grads.items() if name != "eager")
        print(f"step {step}: max |grad eager - grad|: {diffs} "
              f"(max |grad| {grads['eager'].abs().max().item():.3e})")


if __name__ == "__main__":
    main()
