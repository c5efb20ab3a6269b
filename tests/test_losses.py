"""The training losses: dot regression against its dense formula, gradients, errors."""

import pytest
import torch
import torch.nn.functional as F

from gnc.heads import make_head
from gnc.losses import LOSSES, classification_loss, dot_regression

F64 = torch.float64


def _data(B=12, d=8, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, d, generator=g, dtype=F64)
    return 2.0 * h / h.norm(dim=1, keepdim=True), torch.arange(B) % K


def _dense_dr(h, W, b, y):
    """The released code's definition, one sample at a time: ½·mean (w_yᵀh + b_y − 1)²."""
    terms = [(W[c] @ h[i] + b[c] - 1.0) ** 2 for i, c in enumerate(y.tolist())]
    return 0.5 * torch.stack(terms).mean()


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
@pytest.mark.parametrize("bias", [True, False])
def test_dot_regression_is_the_dense_formula_for_every_head(method, bias):
    torch.manual_seed(0)
    head = make_head(method, 8, 4, bias=bias).double()
    h, y = _data()
    if method == "standard" and bias:
        with torch.no_grad():
            head.bias.normal_()
    logits = head(h, y)
    W = head.weight
    if method == "standard":
        b = head.bias if bias else torch.zeros(4, dtype=F64)
    else:  # in training the ETF heads' bias is −W μ_G with the batch's global mean
        b = -W @ h.mean(0) if bias else torch.zeros(4, dtype=F64)
    torch.testing.assert_close(dot_regression(logits, y), _dense_dr(h, W.detach(), b.detach(), y))
    torch.testing.assert_close(classification_loss("dr", logits, y), dot_regression(logits, y))


def test_dot_regression_gradient_by_gradcheck():
    h, y = _data()
    logits = (h @ torch.randn(8, 4, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: dot_regression(z, y), (logits,))
    assert torch.autograd.gradgradcheck(lambda z: dot_regression(z, y), (logits,))
    # through a learned head: d/dh, d/dW and d/db of ½·mean (w_yᵀh + b_y − 1)²
    W = torch.randn(4, 8, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True)
    hh = h.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda h_, W_, b_: dot_regression(F.linear(h_, W_, b_), y),
                                    (hh, W, b))
    # closed form: ∂L/∂z_ic = (z_iy − 1)/B for c = y_i, 0 otherwise
    z = logits.detach().clone().requires_grad_()
    dot_regression(z, y).backward()
    expected = torch.zeros_like(z)
    rows = torch.arange(len(y))
    expected[rows, y] = (z.detach()[rows, y] - 1.0) / len(y)
    torch.testing.assert_close(z.grad, expected)


def test_cross_entropy_by_name_and_errors():
    h, y = _data()
    logits = h @ torch.randn(8, 4, dtype=F64)
    assert LOSSES == ("ce", "dr")
    torch.testing.assert_close(classification_loss("ce", logits, y), F.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="unknown loss 'mse'; choose from ce, dr"):
        classification_loss("mse", logits, y)
    with pytest.raises(ValueError, match=r"Expected `logits` \(B, K\)"):
        dot_regression(logits[0], y)
    with pytest.raises(ValueError, match=r"and `targets` \(B,\)"):
        dot_regression(logits, y[:3])
