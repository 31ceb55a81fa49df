"""Named denoiser sizes, chosen on the command line as `--model.denoiser tiny|small|base`.

Each size has its own default peak learning rate (`DEFAULT_LR`). Parameter counts at in_channels=272 (they
grow slightly with in_channels through the input/output convs): tiny 2.86M, small 20.4M, base 130.6M.
"""

from __future__ import annotations

from torch import nn

from ad_lightning.models.unet import UNet

DENOISERS: dict[str, dict] = {
    # CPU demo and tests: thin at 16x16 (where the FLOPs are), wider at 8x8 and 4x4 (where parameters are cheap);
    # 8 norm groups keep >= 4 channels per group at 32 channels.
    "tiny": dict(
        model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(1,), num_heads=4, norm_groups=8
    ),
    "small": dict(model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2), num_heads=4),
    # InvAD v1 UNet: attention at 8x8, 4x4, 2x2 (for 16x16 features) and in the middle.
    "base": dict(
        model_channels=256, channel_mult=(1, 1, 2, 2), num_res_blocks=2, attention_levels=(1, 2, 3), num_heads=8
    ),
}


# Peak learning rate of each size when --model.lr is not given: 1e-3 was measured best for `tiny`; wider UNets
# need less, about in proportion to 1 / model_channels (`small` diverged at 1e-3 on the photos and trains at 3e-4;
# `base`'s 1e-4 follows the same rule, unmeasured here).
DEFAULT_LR: dict[str, float] = {"tiny": 1e-3, "small": 3e-4, "base": 1e-4}


def build_denoiser(name: str, in_channels: int, **overrides) -> nn.Module:
    """The UNet of size `name` for `in_channels`-channel features; `overrides` replace single UNet kwargs."""
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; choose one of {sorted(DENOISERS)}")
    return UNet(in_channels, **{**DENOISERS[name], **overrides})
