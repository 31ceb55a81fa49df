"""FeatureDDPM: the LightningModule that trains the denoiser on frozen backbone features and
scores test images with the configured heads.

It only orchestrates: diffusion maths is in `diffusion/`, scoring in `heads/`, metrics and
reports in `evaluation/`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ad_lightning.data.tiling import extract_tiles, stitch, tile_boxes
from ad_lightning.diffusion import linear_alpha_bar, q_sample
from ad_lightning.evaluation.report import TestRecorder
from ad_lightning.evaluation.thresholds import fit_threshold
from ad_lightning.evaluation.timing import StageTimer, batch1_latency
from ad_lightning.features.backbone import Backbone
from ad_lightning.features.standardize import FeatureStandardizer
from ad_lightning.heads import Scores, build_head, to_image_map
from ad_lightning.models.registry import build_denoiser


LATENCY_WARMUP = 3  # batch-1 calls discarded before timing


def parse_names(names: str | list[str]) -> list[str]:
    """'likelihood,irf' or ['likelihood', 'irf'] -> ['likelihood', 'irf']."""
    items = names.split(",") if isinstance(names, str) else list(names)
    return [n.strip() for n in items if n.strip()]


class FeatureDDPM(LightningModule):
    """DDPM (epsilon prediction) in the feature space of a frozen timm CNN.

    Args:
        backbone: timm model name; `out_indices` the fused stages; `pretrained` / `backbone_weights`
            resolve weights as in DESIGN.md.
        feature_norm: `channel` standardises features with training statistics, `none` keeps them raw.
        denoiser: a named size from the registry (`tiny`, `small`, `base`); `denoiser_args` overrides.
        heads: scoring heads used by `test`, e.g. `likelihood`; `head_args` per head, e.g.
            `{likelihood: {steps: 3}}`.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with linear warm-up, then cosine decay.
        ema_decay: EMA of the denoiser weights; the EMA copy does all scoring.
        blur_sigma: optional Gaussian blur of upsampled anomaly maps (0 = off, as in InvAD).
        latency_images: test images re-scored one at a time (after 3 warm-up images) for the
            batch-1 latency in metrics.json; 0 turns it off.
        threshold_method, threshold_q: the deployed image threshold of each head, fitted on the
            normal validation scores: the `threshold_q` percentile, or `otsu`.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        out_indices: tuple[int, ...] = (2, 3),
        pretrained: bool = True,
        backbone_weights: str | None = None,
        feature_norm: str = "channel",
        denoiser: str = "tiny",
        denoiser_args: dict | None = None,
        heads: str | list[str] = "likelihood",
        head_args: dict[str, dict] | None = None,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
        ema_decay: float = 0.999,
        blur_sigma: float = 0.0,
        latency_images: int = 20,
        threshold_method: str = "percentile",
        threshold_q: float = 99.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = Backbone(backbone, out_indices, pretrained=pretrained, weights=backbone_weights)
        channels = self.backbone.out_channels
        self.feature_norm = FeatureStandardizer(channels, feature_norm)
        self.denoiser = build_denoiser(denoiser, channels, **(denoiser_args or {}))
        self.ema = AveragedModel(self.denoiser, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        head_args = head_args or {}
        self.heads = nn.ModuleDict(
            {name: build_head(name, num_timesteps=num_timesteps, **head_args.get(name, {})) for name in parse_names(heads)}
        )
        # float64 on the CPU on purpose: DDIM reads python floats from it, training gathers per sample.
        self.alpha_bar = linear_alpha_bar(num_timesteps, beta_start, beta_end)
        self._recorder: TestRecorder | None = None
        self._val_terms: dict[str, list[dict[str, Tensor]]] = {}

    # ----- features and the denoiser ------------------------------------------------------
    def encode(self, image: Tensor) -> Tensor:
        """Images in [0, 1] [B, 3, H, W] -> standardised features z0 [B, C, h, w]."""
        with torch.no_grad():
            return self.feature_norm(self.backbone(image).float())

    def eps_fn(self, x: Tensor, t: Tensor) -> Tensor:
        """The EMA denoiser's noise prediction, in float32 whatever the autocast precision."""
        return self.ema.module(x, t).float()

    def _z0(self, batch: dict) -> Tensor:
        if "features" in batch:
            return self.feature_norm(batch["features"].float())
        return self.encode(batch["image"])

    def diffusion_loss(self, z0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """mean || eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t) ||^2, t ~ U{0..T-1}."""
        t = torch.randint(0, len(self.alpha_bar), (z0.shape[0],), generator=generator, device=z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        a_t = self.alpha_bar[t.cpu()].to(z0.device, torch.float32)
        return F.mse_loss(self.denoiser(q_sample(z0, a_t, noise), t).float(), noise)

    # ----- fit ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before `fit`: compute the frozen backbone's features of the train and validation splits
        once, and the feature statistics from the training features.

        This runs in `setup`, not `on_fit_start`, because the trainer builds the train dataloader
        while configuring the optimizer schedule, before `on_fit_start`.
        """
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "cache_features"):
            raise RuntimeError("FeatureDDPM trains from an AnomalyDataModule (e.g. --data Demo or --data MVTecAD)")
        device = self.trainer.strategy.root_device
        train_features = datamodule.cache_features(self.backbone.to(device), device)
        self.feature_norm.fit(train_features)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.diffusion_loss(self._z0(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size(batch))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_parameters(self.denoiser)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out diffusion loss, and each head's raw terms on normal validation images."""
        z0 = self._z0(batch)
        generator = torch.Generator(z0.device).manual_seed(batch_idx)
        self.log("val/loss", self.diffusion_loss(z0, generator), batch_size=z0.shape[0], sync_dist=True)
        for name, head in self.heads.items():
            self._val_terms.setdefault(name, []).append(head.evaluate(z0, self.eps_fn, self.alpha_bar).terms)

    def on_validation_epoch_end(self) -> None:
        """Fit every head's normalisers, then its decision threshold, on the normal validation
        split (gathered over ranks)."""
        terms, self._val_terms = self._val_terms, {}
        if self.trainer.sanity_checking:
            return
        for name, chunks in terms.items():
            merged = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
            gathered = {key: self.all_gather(value).flatten() for key, value in merged.items()}
            head = self.heads[name]
            head.fit(gathered)
            threshold = fit_threshold(head.score(gathered), self.hparams.threshold_method, self.hparams.threshold_q)
            head.threshold.fill_(threshold)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(hp.warmup_steps, total // 2)
        scheduler = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=max(warmup, 1)),
                torch.optim.lr_scheduler.CosineAnnealingLR(
                    optimizer, T_max=max(total - warmup, 1), eta_min=hp.lr * hp.min_lr_ratio
                ),
            ],
            milestones=[warmup],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- test ----------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        keep = self.hparams.latency_images + LATENCY_WARMUP if self.hparams.latency_images else 0
        self._recorder = TestRecorder(
            {name: head.nfe for name, head in self.heads.items()},
            {name: float(head.threshold) for name, head in self.heads.items()},
            keep_images=keep,
        )

    def score_batch(self, image: Tensor, timer: StageTimer | None = None) -> dict[str, Scores]:
        """Score images [B, 3, H, W] with every head, sharing one backbone forward; maps at H x W."""
        timer = timer or (lambda stage, like: nullcontext())
        with timer("backbone", image):
            z0 = self.encode(image)
        results = {}
        for name, head in self.heads.items():
            with timer(name, image):
                out = head.evaluate(z0, self.eps_fn, self.alpha_bar)
                maps = to_image_map(out.map, image.shape[-2:], self.hparams.blur_sigma)
                results[name] = Scores(head.score(out.terms), out.terms, maps)
        return results

    def score_tiled(
        self, image: Tensor, tile: int, overlap: int, size: int, timer: StageTimer | None = None
    ) -> dict[str, Scores]:
        """Score one large image [3, H, W] tile by tile: tiles resized to `size` as in training,
        tile maps stitched back to [1, H, W]; image score and terms are the max over tiles."""
        boxes = tile_boxes(image.shape[-2], image.shape[-1], tile, overlap)
        tiles = F.interpolate(  # [n, 3, tile, tile] -> [n, 3, size, size], as TileDataset does
            extract_tiles(image, boxes), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        results = {}
        for name, scores in self.score_batch(tiles.clamp(0, 1), timer).items():
            tile_maps = F.interpolate(scores.maps[:, None], size=(tile, tile), mode="bilinear", align_corners=False)
            full = stitch(tile_maps[:, 0], boxes, tuple(image.shape[-2:]))  # [n, tile, tile] -> [H, W]
            terms = {key: value.amax()[None] for key, value in scores.terms.items()}
            results[name] = Scores(scores.score.amax()[None], terms, full[None])
        return results

    def score_images(self, image: Tensor, timer: StageTimer | None = None) -> dict[str, Scores]:
        """`score_batch`, or tile by tile (one image per batch) when the data asks for tiling."""
        tiling = getattr(self.trainer.datamodule, "tiling", None)
        if tiling is None:
            return self.score_batch(image, timer)
        return self.score_tiled(image[0], *tiling, size=self.trainer.datamodule.image_size, timer=timer)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Score a batch with every head; large images tile by tile when the data asks for it.

        Maps and masks are recorded at the evaluation resolution (the data's image_size)."""
        results = self.score_images(batch["image"], self._recorder.timer)
        size = (self.trainer.datamodule.image_size,) * 2
        batch = {**batch, "mask": at_resolution(batch["mask"], size, "nearest")}  # [B, 1, H, W]
        for name, scores in results.items():
            maps = at_resolution(scores.maps[:, None], size, "bilinear")[:, 0]  # [B, H, W]
            self._recorder.add_head(name, scores.score, scores.terms, maps)
        self._recorder.add_batch(batch)

    def on_test_epoch_end(self) -> None:
        """Re-score the first test images one at a time for the batch-1 latency, then report."""
        recorder, self._recorder = self._recorder, None
        if len(recorder.kept) > LATENCY_WARMUP:
            recorder.latency = batch1_latency(self.score_images, recorder.kept, warmup=LATENCY_WARMUP)
        recorder.finish(self.trainer)


def ema_with_warmup(decay: float):
    """EMA update for `AveragedModel` whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    With a fixed 0.999 the average of a short run (a few thousand steps, as on a CPU) would still
    hold much of the random initialisation; the ramp makes it track early training closely.
    """

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(averaged, current):
            avg.lerp_(cur, weight)

    return update


def at_resolution(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """[B, C, H, W] resized to `size` unless it already has it (tiled test images are native size)."""
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode=mode)


def batch_size(batch: dict) -> int:
    return len(next(iter(batch.values())))
