"""The README's "layer in ten lines" example runs and its gradient reaches H_bar."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def ten_line_example() -> str:
    text = README.read_text()
    section = text[text.index("## The layer in ten lines"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under 'The layer in ten lines'"
    return match.group(1)


def test_readme_example_has_a_nonzero_gradient():
    code = ten_line_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    H_bar, W = namespace["H_bar"], namespace["W"]
    K = namespace["K"]
    assert W.shape == (K, namespace["d"])
    assert torch.allclose(W @ W.T, (K / (K - 1)) * (torch.eye(K) - 1.0 / K), atol=1e-5)
    assert H_bar.grad is not None and torch.isfinite(H_bar.grad).all()
    assert H_bar.grad.norm() > 1e-4 * H_bar.norm()
