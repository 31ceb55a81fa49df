"""UNet denoiser and the registry of named sizes: shapes, zero init, timestep use, attention probabilities."""

import csv
import json
import math

import pytest
import torch

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.cli import main
from ad_lightning.models import unet
from ad_lightning.models.registry import DENOISERS, build_denoiser
from ad_lightning.models.unet import AttentionBlock, UNet, timestep_embedding

SMALL = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2)
THREE_LEVELS = {**SMALL, "channel_mult": (1, 2, 2)}  # h, w padded up to multiples of 4


@pytest.fixture(autouse=True)
def seeded():
    """Default initialisation draws from the global generator; seed it so every run sees the same weights."""
    torch.manual_seed(0)


def perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every all-zero parameter (zero-initialised convs, norm biases) random values, so each layer matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def inputs(batch: int, channels: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return x, t


def test_timestep_embedding_matches_sinusoid():
    # dim 4: frequencies exp(-ln(10000) * [0, 1] / 2) = [1, 0.01]; cos half first, then sin.
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]])
    torch.testing.assert_close(timestep_embedding(torch.tensor([0, 1]), 4), expected)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("channels", "height", "width"), [(152, 16, 16), (272, 8, 8), (12, 4, 6)])
def test_output_shape_equals_input_shape(batch, channels, height, width):
    model = perturb_zero_init(UNet(channels, **SMALL))
    x, t = inputs(batch, channels, height, width)
    assert model(x, t).shape == x.shape


def test_untrained_model_predicts_exactly_zero():
    model = UNet(24, **SMALL)
    x, t = inputs(3, 24, 8, 8)
    assert torch.count_nonzero(model(x, t)) == 0


def test_timestep_changes_the_output():
    model = perturb_zero_init(UNet(24, **SMALL))
    x, _ = inputs(2, 24, 8, 8)
    eps_early = model(x, torch.zeros(2, dtype=torch.long))
    eps_late = model(x, torch.full((2,), 999))
    assert (eps_early - eps_late).abs().max() > 1e-3


def test_long_float_and_scalar_timesteps_agree():
    model = perturb_zero_init(UNet(24, **SMALL))
    x, _ = inputs(2, 24, 8, 8)
    eps_long = model(x, torch.tensor([500, 500]))
    assert torch.equal(eps_long, model(x, torch.tensor([500.0, 500.0])))
    assert torch.equal(eps_long, model(x, torch.tensor(500)))


def test_attention_probabilities_are_row_stochastic():
    model = perturb_zero_init(UNet(24, **SMALL))
    x, t = inputs(2, 24, 8, 6)
    eps, attention = model(x, t, return_attention=True)
    # level 0 is 8x6 (48 positions), level 1 and the middle 4x3 (12); encoder, middle, decoder order.
    assert [a.shape[-1] for a in attention] == [48, 12, 12, 12, 12, 48, 48]
    assert len(attention) == len(model.attention_layers)
    for probs in attention:
        n = probs.shape[-1]
        assert probs.shape == (2, SMALL["num_heads"], n, n)
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, SMALL["num_heads"], n), rtol=0, atol=1e-5)


# float32 rounding of the fused kernel vs the explicit softmax accumulates to ~2e-6 over seven attention layers
# and a perturbed network (|eps| ~ 3); in float64 the two paths must agree far below 1e-6.
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_explicit_attention_gives_the_same_eps_as_the_fused_kernel(dtype, atol):
    model = perturb_zero_init(UNet(24, **SMALL)).to(dtype)
    x, t = inputs(2, 24, 8, 6)
    eps, _ = model(x.to(dtype), t, return_attention=True)
    assert eps.dtype == dtype and eps.abs().max() > 0.1
    torch.testing.assert_close(eps, model(x.to(dtype), t), rtol=0, atol=atol)


def test_attention_layers_are_named_in_forward_order():
    model = UNet(24, **SMALL)
    called = []
    for name, module in model.named_modules():
        if isinstance(module, AttentionBlock):
            module.register_forward_hook(lambda module, args, output, name=name: called.append(name))
    model(*inputs(1, 24, 8, 8))
    assert called == model.attention_layers
    assert "middle_block.1" in called


def test_gradients_reach_every_parameter():
    model = perturb_zero_init(UNet(24, **SMALL))
    model(*inputs(2, 24, 8, 8)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_bfloat16_autocast_gives_finite_output():
    model = perturb_zero_init(UNet(24, **SMALL))
    x, t = inputs(2, 24, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eps, attention = model(x, t, return_attention=True)
    assert eps.shape == x.shape and torch.isfinite(eps).all() and eps.abs().max() > 0
    torch.testing.assert_close(attention[0].sum(-1), torch.ones_like(attention[0][..., 0]), rtol=0, atol=1e-5)


def test_bad_input_raises_clear_error():
    model = UNet(24, **{**SMALL, "channel_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match="in_channels"):
        model(*inputs(1, 23, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"num_heads": 5}, "num_heads=5"), ({"attention_levels": (2,)}, "0..1")]
)
def test_bad_configuration_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(24, **{**SMALL, **kwargs})


@pytest.mark.parametrize(("name", "low", "high"), [("tiny", 1e6, 3e6), ("small", 15e6, 30e6), ("base", 100e6, 140e6)])
def test_registry_sizes_build_within_their_parameter_range(name, low, high):
    with torch.device("meta"):
        model = build_denoiser(name, in_channels=272)
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_tiny_denoiser_runs_on_demo_feature_shape():
    model = perturb_zero_init(build_denoiser("tiny", in_channels=152))
    x, t = inputs(2, 152, 16, 16)
    eps = model(x, t)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_registry_overrides_replace_single_kwargs():
    model = build_denoiser("tiny", in_channels=16, num_heads=2)
    heads = {m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}
    assert heads == {2} and DENOISERS["tiny"]["num_heads"] != 2


def test_unknown_denoiser_error_lists_the_names():
    with pytest.raises(ValueError, match="huge") as error:
        build_denoiser("huge", in_channels=16)
    assert all(name in str(error.value) for name in DENOISERS)


def replicate_by_hand(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """x [B, C, h, w] grown to [B, C, height, width] by repeating its last row and column (index clamping)."""
    rows = torch.arange(height).clamp(max=x.shape[-2] - 1)
    cols = torch.arange(width).clamp(max=x.shape[-1] - 1)
    return x[:, :, rows[:, None], cols[None, :]]


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize(("height", "width"), [(14, 14), (16, 16), (20, 20), (32, 32), (14, 20), (6, 5)])
def test_registry_denoisers_run_forward_and_backward_on_any_grid(name, height, width):
    model = perturb_zero_init(build_denoiser(name, in_channels=16))
    x, t = inputs(2, 16, height, width)
    x.requires_grad_(True)
    eps = model(x, t)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    eps.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad[..., -1, -1].abs().sum() > 0  # the last row and column learn too
    assert all(p.grad is not None for p in model.parameters())


def test_a_padded_grid_predicts_as_its_edge_replicated_multiple_cropped():
    """14 x 13 runs as 16 x 16 whose extra rows and columns repeat the last real ones: the prediction
    there is a function of the input alone. It does depend on what the pad holds, as the garbage pad shows."""
    model = perturb_zero_init(UNet(24, **THREE_LEVELS))
    x, t = inputs(2, 24, 14, 13)
    eps = model(x, t)
    assert eps.shape == (2, 24, 14, 13)
    assert torch.equal(eps, model(replicate_by_hand(x, 16, 16), t)[..., :14, :13])
    garbage = replicate_by_hand(x, 16, 16)
    garbage[..., 14:, :] = 5.0
    assert not torch.allclose(model(garbage, t)[..., :14, :13], eps, atol=1e-3)


def test_multiples_take_the_path_without_padding(monkeypatch):
    """No pad, crop or attention restriction on a grid the levels halve evenly (its output stays bit-identical)."""
    model = perturb_zero_init(UNet(24, **THREE_LEVELS))
    x, t = inputs(2, 24, 16, 12)
    expected = model(x, t)
    for name in ("pad_to_multiple", "valid_attention"):
        monkeypatch.setattr(unet, name, lambda *args, name=name: pytest.fail(f"{name} called on a multiple"))
    _, attention = model(x, t, return_attention=True)
    assert torch.equal(model(x, t), expected)
    assert [a.shape[-1] for a in attention] == [192, 48, 12, 48, 48, 192, 192]  # 16 x 12, 8 x 6, 4 x 3


def test_attention_on_a_padded_grid_covers_the_input_and_is_renormalised():
    model = perturb_zero_init(UNet(24, **SMALL))  # 2 levels: 7 x 5 is padded to 8 x 6
    x, t = inputs(2, 24, 7, 5)
    _, attention = model(x, t, return_attention=True)
    # level 0 keeps the 7 x 5 real positions, level 1 the ceil(7/2) x ceil(5/2) = 4 x 3 that cover them
    assert [a.shape[-1] for a in attention] == [35, 12, 12, 12, 12, 35, 35]
    for probs in attention:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), rtol=0, atol=1e-5)
    _, full = model(replicate_by_hand(x, 8, 6), t, return_attention=True)  # [2, heads, 48, 48] at level 0
    real = torch.zeros(8, 6, dtype=torch.bool)
    real[:7, :5] = True
    kept = full[0][:, :, real.flatten()][:, :, :, real.flatten()]
    torch.testing.assert_close(attention[0], kept / kept.sum(-1, keepdim=True))


@pytest.mark.slow
def test_cli_fit_and_test_at_image_size_224(tmp_path, make_mvtec_tree, monkeypatch):
    """224-pixel images give 14 x 14 features, which the tiny denoiser's levels cannot halve twice."""
    monkeypatch.chdir(tmp_path)
    root = make_mvtec_tree(tmp_path / "data", n_train=16, n_test_good=3)
    args = ["--data", "MVTecAD", "--data.root", str(root), "--data.category", "widget", "--data.image_size", "224"]
    args += ["--data.train_batch_size", "8", "--model.denoiser", "tiny", "--model.heads", "likelihood,irf,radar", "--model.latency_images", "0"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    state = load_checkpoint(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    assert state["heads.radar.mean_rows_0"].shape == (49, 49)  # 14 x 14 features: 7 x 7 real positions at level 1
    main(["test", *args, "--ckpt_path", "runs"])
    metrics = json.loads((tmp_path / "runs" / "version_1" / "metrics.json").read_text())
    assert metrics["n_test_images"] == 7 and metrics["evaluation_resolution"] == [224, 224]
    for head in ("likelihood", "irf", "radar"):
        assert 0.0 <= metrics["heads"][head]["image_auroc"] <= 1.0 and 0.0 <= metrics["heads"][head]["pixel_auroc"] <= 1.0
    with (tmp_path / "runs" / "version_1" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and all(math.isfinite(float(row[head])) for row in rows for head in ("likelihood", "irf", "radar"))
