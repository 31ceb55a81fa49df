"""The fast inference path (`prepare_inference`, `score_batch` in inference mode) scores as the default path."""

import copy

import pytest
import torch

from ad_lightning.lit import FeatureDDPM

HEADS = ["likelihood", "irf", "reconstruction"]
IMAGE_SIZE = 64  # a 4 x 4 feature grid: the tiny UNet's two downsamplings fit


@pytest.fixture(scope="module")
def model() -> FeatureDDPM:
    """Pretrained Lite0, a tiny denoiser with random weights everywhere (also in its zero-initialised
    layers, so eps is not 0), every head fitted on random normal images."""
    torch.manual_seed(0)
    model = FeatureDDPM(heads=HEADS).eval()
    with torch.no_grad():
        for p in model.ema.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
        normal = torch.rand(20, 3, IMAGE_SIZE, IMAGE_SIZE)  # 8 to fit, 12 to calibrate (min-max needs >= 10)
        model.feature_norm.fit(model.backbone(normal))
        z0 = model.encode(normal)
        for head in model.heads.values():
            head.fit_train([z0[:8]], model.eps_fn, model.alpha_bar)
            head.calibrate(head.evaluate(z0[8:], model.eps_fn, model.alpha_bar))
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def assert_same_scores(actual: dict, expected: dict, tolerance: float = 1e-5) -> None:
    """Every head's score, terms and map agree within `tolerance` (absolute, and relative for large values)."""
    assert list(actual) == list(expected)
    for name in expected:
        pairs = [("score", actual[name].score, expected[name].score), ("maps", actual[name].maps, expected[name].maps)]
        pairs += [(key, actual[name].terms[key], value) for key, value in expected[name].terms.items()]
        for what, a, e in pairs:
            torch.testing.assert_close(a, e, atol=tolerance, rtol=tolerance, msg=lambda m: f"{name} {what}: {m}")


def test_channels_last_path_scores_as_the_default_path(model, images):
    expected = model.score_batch(images)
    fast = copy.deepcopy(model).prepare_inference(channels_last=True, bf16=True)  # bf16 is for CUDA only
    conv = fast.backbone.model.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.backbone.modules())  # folded into the convs
    assert_same_scores(fast.score_batch(images), expected)


def test_scores_are_computed_in_inference_mode(model, images):
    scores = model.score_batch(images, heads=["irf"])["irf"]
    assert scores.score.is_inference() and scores.maps.is_inference()


def test_a_batch_scores_each_image_as_if_alone(model, images):
    """The vectorised heads keep images apart: batch scores equal batch-1 scores."""
    batch = model.score_batch(images)
    alone = [model.score_batch(image[None]) for image in images]
    for name, scores in batch.items():
        torch.testing.assert_close(scores.score, torch.cat([a[name].score for a in alone]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.maps, torch.cat([a[name].maps for a in alone]), atol=1e-5, rtol=1e-5)


def test_the_cpu_backbone_runs_on_cache_sized_chunks_with_unchanged_features(model):
    """Five 256 x 256 images go through the backbone two at a time, with the features of one batch."""
    images = torch.rand(5, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    calls = []
    hook = model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        z0 = model.encode(images)
    finally:
        hook.remove()
    assert calls == [2, 2, 1]
    with torch.no_grad():
        whole = model.feature_norm(model.backbone(images))
    torch.testing.assert_close(z0, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # compiling the backbone and the denoiser: 1 to 2.5 min on the shared 2-core CPU
def test_compiled_path_scores_as_the_default_path(model, images):
    compiled = copy.deepcopy(model).prepare_inference(compile=True)
    assert_same_scores(compiled.score_batch(images), model.score_batch(images))
