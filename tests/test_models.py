"""Backbones: every registered name builds and runs; stems, channels, projection, errors."""

import pytest
import torch
from torch import nn

from gnc.models import BACKBONES, UnconstrainedFeatures, build_backbone

IMAGE = (3, 32, 32)


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize(
    ("name", "in_shape", "width", "d"),
    [
        ("mlp", (40,), 32, 32),
        ("cnn1d", (40,), 16, 16),
        ("resnet18", IMAGE, 16, 128),
        ("resnet34", IMAGE, 8, 64),
        ("resnet50", IMAGE, 64, 2048),
        ("vgg11_bn", IMAGE, 16, 128),
        ("vgg13_bn", IMAGE, 16, 128),
        ("vgg16_bn", IMAGE, 64, 512),
    ],
)
def test_backbone_forward(name: str, in_shape: tuple, width: int, d: int) -> None:
    torch.manual_seed(0)
    net, dim = build_backbone(name, in_shape=in_shape, width=width)
    assert dim == d
    out = _forward(net, torch.randn(2, *in_shape))
    assert out.shape == (2, d)
    assert torch.isfinite(out).all()


def test_registry_is_covered() -> None:
    assert set(BACKBONES) == {
        "ufm",
        "mlp",
        "cnn1d",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "wide_resnet50_2",
        "wide_resnet101_2",
        "vgg11_bn",
        "vgg13_bn",
        "vgg16_bn",
    }


def test_ufm_looks_up_sample_vectors() -> None:
    torch.manual_seed(0)
    net, d = build_backbone("ufm", in_shape=(), num_samples=50, feature_dim=12)
    assert isinstance(net, UnconstrainedFeatures) and d == 12
    idx = torch.tensor([3, 7, 3])
    h = net(idx)
    assert h.shape == (3, 12)
    torch.testing.assert_close(h[0], net.weight[3])
    torch.testing.assert_close(h[0], h[2])
    # N(0, 1/d) init: row norms around 1
    assert 0.7 < net.weight.norm(dim=1).mean() < 1.3


def test_ufm_needs_num_samples() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        build_backbone("ufm", in_shape=())


def test_mlp_options_and_feature_dim() -> None:
    net, d = build_backbone(
        "mlp", in_shape=(1, 8, 8), width=16, feature_dim=10, depth=2, batch_norm=False
    )
    assert d == 10
    assert not any(isinstance(m, nn.BatchNorm1d) for m in net.modules())
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 2
    assert _forward(net, torch.randn(4, 1, 8, 8)).shape == (4, 10)
    with pytest.raises(ValueError, match="does not take option"):
        build_backbone("mlp", in_shape=(4,), dropout=0.1)
    with pytest.raises(ValueError, match="does not take option"):
        build_backbone("resnet18", in_shape=IMAGE, depth=3)


def test_resnet_small_stem_default_and_override() -> None:
    small, _ = build_backbone("resnet18", in_shape=IMAGE, width=8)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert isinstance(small.fc, nn.Identity)
    big, d = build_backbone("resnet18", in_shape=(3, 96, 96), width=8, small_input=False)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    assert _forward(big, torch.randn(2, 3, 96, 96)).shape == (2, d)
    # default for large images is the ImageNet stem
    large, _ = build_backbone("resnet18", in_shape=(3, 128, 128), width=8)
    assert large.conv1.kernel_size == (7, 7)


def test_resnet_width_sets_channels() -> None:
    net, d = build_backbone("resnet18", in_shape=IMAGE, width=16)
    assert d == 128
    assert net.layer1[0].conv1.in_channels == 16
    assert net.layer4[-1].conv2.out_channels == 128


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_one_channel_input(name: str) -> None:
    net, d = build_backbone(name, in_shape=(1, 28, 28), width=8)
    assert _forward(net, torch.randn(2, 1, 28, 28)).shape == (2, d)


def test_tiny_images_keep_a_valid_vgg() -> None:
    net, d = build_backbone("vgg11_bn", in_shape=(1, 8, 8), width=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    assert _forward(net, torch.randn(2, 1, 8, 8)).shape == (2, d)


def test_vgg_large_input_keeps_fc_features() -> None:
    net, d = build_backbone("vgg11_bn", in_shape=(3, 64, 64), width=8, small_input=False)
    assert d == 4096
    assert _forward(net, torch.randn(1, 3, 64, 64)).shape == (1, 4096)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "cnn1d"])
def test_projection_to_feature_dim(name: str) -> None:
    in_shape = (40,) if name == "cnn1d" else IMAGE
    net, d = build_backbone(name, in_shape=in_shape, width=8, feature_dim=20)
    assert d == 20
    assert isinstance(net, nn.Sequential) and isinstance(net[-1], nn.Linear)
    assert _forward(net, torch.randn(2, *in_shape)).shape == (2, 20)
    # same width as native: no projection
    plain, d2 = build_backbone(
        name, in_shape=in_shape, width=8, feature_dim=8 if name == "cnn1d" else 64
    )
    assert d2 == (8 if name == "cnn1d" else 64)
    assert not isinstance(plain, nn.Sequential) or not isinstance(plain[-1], nn.Linear)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'x'; choose from ufm"):
        build_backbone("x", in_shape=IMAGE)
    with pytest.raises(ValueError, match=r"expects images with in_shape \(C, H, W\)"):
        build_backbone("resnet18", in_shape=(40,))
    with pytest.raises(ValueError, match=r"expects in_shape \(L,\) or \(C, L\)"):
        build_backbone("cnn1d", in_shape=IMAGE)
    with pytest.raises(ValueError, match="feature_dim"):
        build_backbone("mlp", in_shape=(4,), feature_dim=0)


@pytest.mark.parametrize(("name", "width", "d", "mid"), [
    ("resnet101", 8, 256, 8),  # plain bottleneck: planes channels
    ("resnext50_32x4d", 16, 512, 32),  # 32 groups x 1 channel = 2 x planes, grouped
    ("wide_resnet50_2", 8, 256, 16),  # twice the bottleneck width
])
def test_resnet_family_uses_the_cifar_stem_and_scales_with_width(name, width, d, mid) -> None:
    net, got = build_backbone(name, in_shape=(3, 32, 32), width=width)
    assert got == d == net.out_dim
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net.layer1[0].conv2.out_channels == mid
    if name.startswith("resnext"):
        assert net.layer1[0].conv2.groups == 32
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, d)
    big, _ = build_backbone(name, in_shape=(3, 224, 224), width=width)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, torch.nn.MaxPool2d)


def test_resnext_too_narrow_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"'resnext50_32x4d' needs `width` >= 16"):
        build_backbone("resnext50_32x4d", in_shape=(3, 32, 32), width=8)
