"""Folding the frozen backbone's BatchNorms into its convolutions changes no feature, only the time."""

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from ad_lightning.features.backbone import Backbone, conv_batchnorm_pairs


def randomise_batchnorms(backbone: Backbone) -> None:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.running_mean, module.weight, module.bias):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def batchnorms(backbone: Backbone) -> list[nn.Module]:
    return [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize(
    ("name", "out_indices", "act"),
    [("tf_efficientnet_lite0", (2, 3), nn.ReLU6), ("resnet18", (1, 2), nn.ReLU)],  # BatchNormAct2d; plain BN
)
def test_folded_backbone_gives_the_same_features_without_batchnorm(name, out_indices, act):
    with pytest.warns(UserWarning, match="random weights"):
        backbone = Backbone(name, out_indices=out_indices, pretrained=False)
    randomise_batchnorms(backbone)
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = backbone(images)
    count = len(batchnorms(backbone))
    assert backbone.fold_batchnorm() == count > 0
    assert batchnorms(backbone) == []
    assert any(isinstance(m, act) for m in backbone.modules())  # the activations after the folded norms stay
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), expected, atol=1e-4, rtol=1e-4)
    assert backbone.fold_batchnorm() == 0  # nothing left: a second call changes nothing


def test_a_batchnorm_not_fed_by_a_convolution_is_left_alone():
    """A norm reading a sum (a residual branch's output) has no single convolution to fold into."""

    class SumThenNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.norm = BatchNormAct2d(4)

        def forward(self, x):
            return self.norm(self.a(x) + self.b(x))

    network = SumThenNorm().eval()
    assert conv_batchnorm_pairs(network, torch.zeros(1, 3, 8, 8)) == []
