"""Feature extractors ("backbones") and their registry.

A backbone maps a batch of inputs to a batch of penultimate-layer features ``h ∈ R^d``; the
classifier head (:mod:`gnc.heads`) sits on top of it. :func:`build_backbone` returns the module
together with its feature width ``d`` so that a head can be sized without a dummy forward.

=============  ====================================================  ============================
name           architecture                                          feature width ``d``
=============  ====================================================  ============================
``ufm``        one free vector per training sample (x = sample id)   ``feature_dim`` or ``width``
``mlp``        flatten → ``depth`` × (Linear, BatchNorm, ReLU)        ``feature_dim`` or ``width``
``cnn1d``      4 × (Conv1d, BatchNorm, ReLU) → global average pool   ``width``
``resnet18``   torchvision ResNet-18, ``fc`` removed                 ``8·width``
``resnet34``   torchvision ResNet-34, ``fc`` removed                 ``8·width``
``resnet50``   torchvision ResNet-50, ``fc`` removed                 ``32·width``
``resnet101``  torchvision ResNet-101, ``fc`` removed                ``32·width``
``resnet152``  torchvision ResNet-152, ``fc`` removed                ``32·width``
``resnext*``   ``resnext50_32x4d``, ``resnext101_32x8d``              ``32·width``
``wide_*``     ``wide_resnet50_2``, ``wide_resnet101_2``              ``32·width``
``vgg11_bn``   torchvision VGG-11-BN features (see below)            ``8·width`` or 4096
``vgg13_bn``   torchvision VGG-13-BN features                        ``8·width`` or 4096
``vgg16_bn``   torchvision VGG-16-BN features                        ``8·width`` or 4096
=============  ====================================================  ============================

The ResNet family (every member the paper's released code offers) shares one builder: with
``small_input`` (default for images up to 64 px) the CIFAR stem replaces the ImageNet one
(3×3 stride-1 first conv, no max-pool); ResNeXt's groups and the wide networks' doubled
bottleneck width follow ``width`` like the plain ResNets.

For every backbone except ``ufm`` and ``mlp`` (which produce ``feature_dim`` features
directly), a ``feature_dim`` that differs from the native width appends a linear projection
``nn.Linear(d_native, feature_dim)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from torchvision.models import resnet as tv_resnet

__all__ = [
    "BACKBONES",
    "MLP",
    "CNN1d",
    "UnconstrainedFeatures",
    "VGGFeatures",
    "build_backbone",
]


class UnconstrainedFeatures(nn.Embedding):
    r"""Unconstrained feature model: one free feature vector per training sample.

    .. math::  h_i = E[i], \qquad E \in \mathbb{R}^{N \times d}

    The input is the LongTensor of sample indices (the ``ufm`` dataset yields the index as
    ``x``), so the features themselves are the trained parameters (Mixon et al. 2020;
    Zhu et al. 2021). The table is initialised ``E_ij ~ N(0, 1/d)``, so every vector starts with
    norm ≈ 1.

    Args:
        num_samples: N, the number of training samples.
        feature_dim: d, the feature width.

    Shape:
        - Input: ``(B,)`` integer sample indices in ``[0, N)``.
        - Output: ``(B, d)``.
    """

    def __init__(self, num_samples: int, feature_dim: int, **factory_kwargs: Any) -> None:
        super().__init__(num_samples, feature_dim, **factory_kwargs)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.embedding_dim**-0.5)


class MLP(nn.Sequential):
    """Flatten, then ``depth`` blocks of ``Linear → BatchNorm1d (optional) → ReLU``.

    All hidden layers have ``width`` units except the last, which has ``out_dim`` units
    (the feature width).

    Args:
        in_dim: number of input features after flattening.
        width: hidden width.
        out_dim: feature width d (output of the last block).
        depth: number of blocks (≥ 1).
        batch_norm: insert ``BatchNorm1d`` after every linear layer.
    """

    def __init__(
        self, in_dim: int, width: int, out_dim: int, *, depth: int = 3, batch_norm: bool = True
    ) -> None:
        if depth < 1:
            raise ValueError(f"Expected `depth` >= 1, but got {depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        dims = [in_dim] + [width] * (depth - 1) + [out_dim]
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class CNN1d(nn.Module):
    """A small 1-D CNN for sequences such as MNIST-1D.

    Four ``Conv1d → BatchNorm1d → ReLU`` layers with ``width`` channels (kernel 5, then three
    kernel-3 stride-2 layers), then global average pooling over positions.

    Args:
        in_channels: channels of the input; a ``(B, L)`` input is treated as one channel.
        width: channels of every conv layer = the feature width d.

    Shape:
        - Input: ``(B, L)`` or ``(B, C, L)``.
        - Output: ``(B, width)``.
    """

    def __init__(self, in_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        specs = [(in_channels, 5, 1), (width, 3, 2), (width, 3, 2), (width, 3, 2)]
        layers: list[nn.Module] = []
        for c_in, k, stride in specs:
            layers += [
                nn.Conv1d(c_in, width, k, stride=stride, padding=k // 2, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, L) -> (B, 1, L)
        return self.pool(self.features(x)).flatten(1)  # (B, width)


class VGGFeatures(nn.Module):
    """Convolutional part of a torchvision VGG (with BatchNorm) as a feature extractor.

    * ``small_input=True`` (images of at most 64 pixels a side): ``features`` → adaptive average
      pool to 1×1 → flatten, so d = the last conv's channels (512 at ``width=64``). Trailing
      max-pools that would shrink the map below 1×1 (inputs under 32 pixels, e.g. 28×28 MNIST
      keeps 4 of the 5) are replaced by ``Identity``.
    * ``small_input=False``: torchvision's layout — ``features`` → adaptive pool to 7×7 →
      flatten → torchvision's classifier without its last layer
      (``Linear(512·49, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout``), so d = 4096.

    Args:
        cfg: a torchvision VGG configuration (``torchvision.models.vgg.cfgs``).
        in_channels: input channels.
        width: channel count of the first stage (64 in VGG); the stages scale with it.
        small_input: see above.
        min_side: smallest spatial side of the input, used to drop surplus max-pools.
    """

    def __init__(
        self,
        cfg: Sequence[str | int],
        *,
        in_channels: int = 3,
        width: int = 64,
        small_input: bool = True,
        min_side: int = 32,
    ) -> None:
        super().__init__()
        scaled: list[str | int] = [
            v if v == "M" else max(1, round(int(v) * width / 64)) for v in cfg
        ]
        from torchvision.models import vgg as tv_vgg  # torchvision on first use (1–2 s)

        features = tv_vgg.make_layers(scaled, batch_norm=True)
        if in_channels != 3:
            first = features[0]
            features[0] = nn.Conv2d(in_channels, first.out_channels, kernel_size=3, padding=1)
        pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
        keep = max(0, int(math.floor(math.log2(max(min_side, 1)))))
        for i in pools[keep:]:
            features[i] = nn.Identity()
        self.features = features
        channels = [v for v in scaled if v != "M"][-1]
        assert isinstance(channels, int)
        if small_input:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.head: nn.Module = nn.Identity()
            self.out_dim = channels
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.head = nn.Sequential(
                nn.Linear(channels * 7 * 7, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, 4096),
                nn.ReLU(True),
                nn.Dropout(),
            )
            self.out_dim = 4096
        # torchvision's VGG initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.head(x)  # (B, out_dim)


# --------------------------------------------------------------------------- builders
#
# Every builder has the signature
#     builder(in_shape, *, num_samples, feature_dim, small_input, width, **options)
# and returns (module, d, projected): `projected` is True when the builder already produces
# `feature_dim` features itself (ufm, mlp), so build_backbone must not append a projection.


def _image_shape(name: str, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(
            f"backbone '{name}' expects images with in_shape (C, H, W), but got {in_shape}"
        )
    c, h, w = (int(s) for s in in_shape)
    return c, h, w


def _build_ufm(
    in_shape: tuple[int, ...],
    *,
    num_samples: int | None,
    feature_dim: int | None,
    small_input: bool | None,
    width: int,
) -> tuple[nn.Module, int, bool]:
    if num_samples is None:
        raise ValueError("backbone 'ufm' needs `num_samples` (the number of training samples)")
    d = feature_dim if feature_dim is not None else width
    return UnconstrainedFeatures(num_samples, d), d, True


def _build_mlp(
    in_shape: tuple[int, ...],
    *,
    num_samples: int | None,
    feature_dim: int | None,
    small_input: bool | None,
    width: int,
    depth: int = 3,
    batch_norm: bool = True,
) -> tuple[nn.Module, int, bool]:
    d = feature_dim if feature_dim is not None else width
    in_dim = math.prod(in_shape)
    return MLP(in_dim, width, d, depth=depth, batch_norm=batch_norm), d, True


def _build_cnn1d(
    in_shape: tuple[int, ...],
    *,
    num_samples: int | None,
    feature_dim: int | None,
    small_input: bool | None,
    width: int,
) -> tuple[nn.Module, int, bool]:
    if len(in_shape) == 1:
        in_channels = 1
    elif len(in_shape) == 2:
        in_channels = int(in_shape[0])
    else:
        raise ValueError(f"backbone 'cnn1d' expects in_shape (L,) or (C, L), but got {in_shape}")
    return CNN1d(in_channels, width), width, False


def _resnet_builder(arch: str) -> Callable[..., tuple[nn.Module, int, bool]]:
    def build(
        in_shape: tuple[int, ...],
        *,
        num_samples: int | None,
        feature_dim: int | None,
        small_input: bool | None,
        width: int,
    ) -> tuple[nn.Module, int, bool]:
        c, h, w = _image_shape(arch, in_shape)
        small = max(h, w) <= 64 if small_input is None else small_input
        net = _resnet(arch, in_channels=c, small_input=small, width=width)
        return net, net.out_dim, False

    build.__doc__ = f"Build torchvision's {arch} without its classifier (see module doc)."
    return build


def _resnet(arch: str, *, in_channels: int, small_input: bool, width: int) -> nn.Module:
    """torchvision ResNet with ``fc = Identity`` and optional small stem / width / channels.

    ``width`` ≠ 64 rebuilds the stem and the four stages with ``width, 2w, 4w, 8w`` base
    channels using torchvision's own blocks and initialisation. ``small_input`` replaces the
    7×7 stride-2 stem conv by a 3×3 stride-1 conv and drops the max-pool (the usual CIFAR stem).
    """
    import torchvision.models  # on first use (1–2 s)

    net: tv_resnet.ResNet = getattr(torchvision.models, arch)(weights=None)
    block = type(net.layer1[0])
    # torchvision's bottleneck has ⌊planes·base_width/64⌋·groups channels: with planes scaled
    # to width·2^s this stays proportional (ResNeXt-50 32x4d: 2·planes) for widths that are
    # multiples of 64/base_width, and is empty below it.
    if width * net.base_width < 64:
        raise ValueError(
            f"backbone '{arch}' needs `width` >= {-(-64 // net.base_width)} (each of its "
            f"{net.groups} groups has width*{net.base_width}/64 channels), but got {width}"
        )
    if width != 64:
        layers = [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)]
        net.inplanes = width
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(block, width, layers[0])
        net.layer2 = net._make_layer(block, 2 * width, layers[1], stride=2)
        net.layer3 = net._make_layer(block, 4 * width, layers[2], stride=2)
        net.layer4 = net._make_layer(block, 8 * width, layers[3], stride=2)
    if small_input:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3 or width != 64:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    for m in net.modules():  # torchvision's ResNet initialisation (re-applied to new layers)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    net.out_dim = 8 * width * block.expansion
    net.fc = nn.Identity()
    return net


def _vgg_builder(arch: str, cfg_key: str) -> Callable[..., tuple[nn.Module, int, bool]]:
    def build(
        in_shape: tuple[int, ...],
        *,
        num_samples: int | None,
        feature_dim: int | None,
        small_input: bool | None,
        width: int,
    ) -> tuple[nn.Module, int, bool]:
        c, h, w = _image_shape(arch, in_shape)
        small = max(h, w) <= 64 if small_input is None else small_input
        from torchvision.models import vgg as tv_vgg

        net = VGGFeatures(
            tv_vgg.cfgs[cfg_key],
            in_channels=c,
            width=width,
            small_input=small,
            min_side=min(h, w),
        )
        return net, net.out_dim, False

    build.__doc__ = f"Build the feature part of torchvision's {arch} (see :class:`VGGFeatures`)."
    return build


BACKBONES: dict[str, Callable[..., tuple[nn.Module, int, bool]]] = {
    "ufm": _build_ufm,
    "mlp": _build_mlp,
    "cnn1d": _build_cnn1d,
    "resnet18": _resnet_builder("resnet18"),
    "resnet34": _resnet_builder("resnet34"),
    "resnet50": _resnet_builder("resnet50"),
    "resnet101": _resnet_builder("resnet101"),
    "resnet152": _resnet_builder("resnet152"),
    "resnext50_32x4d": _resnet_builder("resnext50_32x4d"),
    "resnext101_32x8d": _resnet_builder("resnext101_32x8d"),
    "wide_resnet50_2": _resnet_builder("wide_resnet50_2"),
    "wide_resnet101_2": _resnet_builder("wide_resnet101_2"),
    "vgg11_bn": _vgg_builder("vgg11_bn", "A"),
    "vgg13_bn": _vgg_builder("vgg13_bn", "B"),
    "vgg16_bn": _vgg_builder("vgg16_bn", "D"),
}
"""Backbone builders by name. Use :func:`build_backbone` rather than calling them directly."""


def _check_fits_data(name: str, in_shape: tuple[int, ...]) -> None:
    """``ufm`` reads sample indices (``in_shape == ()``), every other backbone real inputs."""
    if name == "ufm" and in_shape != ():
        raise ValueError(
            f"Expected inputs of shape () (sample indices, the `ufm` dataset) for backbone "
            f"'ufm', but got inputs of shape {in_shape}; choose another --model (e.g. mlp)"
        )
    if name != "ufm" and in_shape == ():
        raise ValueError(
            f"Expected input features for backbone '{name}', but got sample indices (inputs "
            "of shape (), the `ufm` dataset); use --model ufm"
        )


def build_backbone(
    name: str,
    *,
    in_shape: tuple[int, ...],
    num_samples: int | None = None,
    feature_dim: int | None = None,
    small_input: bool | None = None,
    width: int = 64,
    **options: Any,
) -> tuple[nn.Module, int]:
    """Build a backbone by name and return it with its feature width ``d``.

    Args:
        name: one of :data:`BACKBONES` (table in the module docstring).
        in_shape: shape of one input ``x`` without the batch dimension: ``()`` for ``ufm``
            (x is a sample index), ``(L,)`` or ``(C, L)`` for ``cnn1d``, ``(C, H, W)`` for the
            ResNets and VGGs (``C != 3`` replaces the first conv), anything for ``mlp``
            (flattened).
        num_samples: number of training samples; required by ``ufm`` (one vector each), not
            used by the others.
        feature_dim: feature width d. ``ufm`` and ``mlp`` produce it directly (default
            ``width``); for the other backbones, a value that differs from the native width
            appends ``nn.Linear(d_native, feature_dim)``.
        small_input: image backbones only: use the small-image stem (ResNet: 3×3 stride-1 first
            conv, no max-pool; VGG: global 1×1 pooling and no 4096-wide FC layers). Default:
            ``max(H, W) <= 64``.
        width: base channel count / hidden width (default 64 = the torchvision networks).
            ResNet stages get ``width, 2w, 4w, 8w`` channels (``width=16``: a narrow ResNet-18
            for CPU); VGG stages scale by ``width/64``; ``mlp`` hidden width; ``cnn1d``
            channels; ``ufm`` d when ``feature_dim`` is not given.
        **options: backbone-specific options: ``mlp`` takes ``depth`` (number of
            Linear-BN-ReLU blocks, default 3) and ``batch_norm`` (default True).

    Returns:
        ``(module, d)``: ``module(x)`` has shape ``(B, d)``.

    Raises:
        ValueError: unknown name, an option the backbone does not take, or an ``in_shape``
            the backbone cannot read (``ufm`` takes only ``()``, the others never ``()``).

    Example:
        >>> net, d = build_backbone("resnet18", in_shape=(3, 32, 32), width=16)
        >>> d
        128
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose from {', '.join(BACKBONES)}")
    if name != "mlp" and options:
        raise ValueError(
            f"backbone '{name}' does not take option(s) {', '.join(map(repr, options))}"
        )
    unknown = set(options) - {"depth", "batch_norm"}
    if unknown:
        raise ValueError(
            f"backbone 'mlp' does not take option(s) {', '.join(map(repr, sorted(unknown)))}; "
            "it takes 'depth', 'batch_norm'"
        )
    if feature_dim is not None and feature_dim < 1:
        raise ValueError(f"Expected `feature_dim` >= 1, but got {feature_dim}")
    if width < 1:
        raise ValueError(f"Expected `width` >= 1, but got {width}")
    in_shape = tuple(int(s) for s in in_shape)
    _check_fits_data(name, in_shape)
    module, d, projected = BACKBONES[name](
        in_shape,
        num_samples=num_samples,
        feature_dim=feature_dim,
        small_input=small_input,
        width=width,
        **options,
    )
    if not projected and feature_dim is not None and feature_dim != d:
        module = nn.Sequential(module, nn.Linear(d, feature_dim))
        d = feature_dim
    return module, d
