"""Normalisation-layer surgery applied after a backbone is built."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["without_bn_affine"]


def without_bn_affine(module: nn.Module) -> nn.Module:
    r"""Make every BatchNorm in ``module`` non-affine, in place: ``y = (x − E[x])/√(Var[x] + ε)``.

    Each ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) loses its learned scale γ and shift β
    (``affine=False``: ``weight`` and ``bias`` become ``None`` and leave ``parameters()`` and
    the ``state_dict``); its running statistics, ``eps`` and ``momentum`` are kept. This is
    the released code's ``--no-bias`` backbone (``norm_layer(..., affine=bias)``), applied to
    any backbone after it is built, so the backbones need no option of their own. Call it
    before the optimiser is built (it removes parameters).

    Returns ``module``.

    Example:
        >>> net = without_bn_affine(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
        >>> net[1].weight is None, len(list(net[1].parameters()))
        (True, 0)
    """
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.affine:
            m.affine = False
            # re-registering as None keeps the attribute (forward reads it) but drops the
            # parameter, exactly as a layer built with affine=False has it
            m.register_parameter("weight", None)
            m.register_parameter("bias", None)
    return module
