"""FeatureDDPM: the LightningModule that trains the denoiser on frozen backbone features and
scores test images with the configured heads.

It only orchestrates: diffusion maths is in `diffusion/`, scoring in `heads/`, metrics and
reports in `evaluation/`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.data.stored import trained_categories
from ad_lightning.data.tiling import extract_tiles, stitch, tile_boxes
from ad_lightning.diffusion import SharedCalls, linear_alpha_bar, noise_correlation, q_sample
from ad_lightning.errors import UsageError
from ad_lightning.evaluation.report import TestRecorder
from ad_lightning.evaluation.thresholds import METHODS as THRESHOLD_METHODS
from ad_lightning.evaluation.thresholds import is_anomalous
from ad_lightning.evaluation.timing import StageTimer, batch1_latency
from ad_lightning.features.backbone import Backbone
from ad_lightning.features.standardize import FeatureStandardizer
from ad_lightning.heads import HEADS, EnsembleHead, HeadOutput, Scores, build_head, to_image_map
from ad_lightning.heads.base import at_resolution
from ad_lightning.models.registry import DEFAULT_LR, build_denoiser

LATENCY_WARMUP = 3  # batch-1 calls discarded before timing
HEADS_NOT_CURRENT = (
    "its heads were not fitted on its weights (a checkpoint written during training); fitting them on the "
    "normal training and validation splits before scoring"
)
# noise_correlation below this: the denoiser learned nothing (measured at 1000 steps: tiny 0.44, small at lr 3e-4
# 0.79 to 0.80, small diverged at lr 1e-3 0.001 to 0.002)
LEARNED_CORRELATION = 0.1
CPU_BACKBONE_PIXELS = 2 * 256 * 256  # image pixels per backbone call on the CPU (measured best: 2 images of 256 px)


def parse_names(names: str | list[str]) -> list[str]:
    """'likelihood,irf' or ['likelihood', 'irf'] -> ['likelihood', 'irf']."""
    items = names.split(",") if isinstance(names, str) else list(names)
    return [n.strip() for n in items if n.strip()]


class FeatureDDPM(LightningModule):
    """DDPM (epsilon prediction) in the feature space of a frozen timm CNN.

    Args:
        backbone: timm model name; `out_indices` the fused stages; `pretrained` / `backbone_weights`
            resolve weights as docs/architecture.md describes; `grid` the fused grid: the coarsest
            stage's (stride 16) or the finest one's (stride 8: 4 times the positions and denoiser cost);
            `feature_aggregate` the neighbourhood each stage is averaged over before the fusion (1 = off).
        feature_norm: `channel` standardises features with training statistics, `none` keeps them raw.
        denoiser: a named size from the registry (`tiny`, `small`, `base`); `denoiser_args` overrides.
        heads: scoring heads used by `test`, e.g. `likelihood`; `head_args` per head, e.g.
            `{likelihood: {steps: 3}}`.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with linear warm-up, then cosine decay; `lr`
            None takes the denoiser size's default (`DEFAULT_LR`: wider UNets diverge at tiny's 1e-3).
        ema_decay: EMA of the denoiser weights; the EMA copy does all scoring.
        blur_sigma: optional Gaussian blur of upsampled anomaly maps (0 = off, as in InvAD), for heads
            that do not set their own (`patchcore` blurs with sigma 4, as its paper does).
        latency_images: test images re-scored one at a time (after 3 warm-up images), each head alone,
            for its batch-1 latency in metrics.json; 0 turns it off.
        threshold_method, threshold_q: the deployed image threshold of each head, fitted on the
            normal validation scores: their `threshold_q` percentile, that of a Gaussian fitted to them
            (`gaussian`, for few validation images), or `otsu`.
        fit_heads_every_n_epochs: heads are fitted and calibrated once, at the end of training, on the
            final EMA weights (0); k > 0 also fits them every k epochs, e.g. to watch them during training.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        out_indices: tuple[int, ...] = (2, 3),
        pretrained: bool = True,
        backbone_weights: str | None = None,
        grid: str = "coarsest",
        feature_aggregate: int = 1,
        feature_norm: str = "channel",
        denoiser: str = "tiny",
        denoiser_args: dict | None = None,
        heads: str | list[str] = "likelihood",
        head_args: dict[str, dict] | None = None,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
        ema_decay: float = 0.999,
        blur_sigma: float = 0.0,
        latency_images: int = 20,
        threshold_method: str = "percentile",
        threshold_q: float = 99.0,
        fit_heads_every_n_epochs: int = 0,
    ) -> None:
        super().__init__()
        if threshold_method not in THRESHOLD_METHODS:
            raise UsageError(
                f"--model.threshold_method {threshold_method!r} is not one of {', '.join(THRESHOLD_METHODS)}"
            )
        if fit_heads_every_n_epochs < 0:
            raise ValueError(
                f"fit_heads_every_n_epochs={fit_heads_every_n_epochs} must be >= 0 (0: at the end of training only); "
                "set --model.fit_heads_every_n_epochs"
            )
        self.save_hyperparameters()
        self.backbone = Backbone(
            backbone, out_indices, pretrained=pretrained, weights=backbone_weights, grid=grid, aggregate=feature_aggregate
        )
        channels = self.backbone.out_channels
        self.feature_norm = FeatureStandardizer(channels, feature_norm)
        self.denoiser = build_denoiser(denoiser, channels, **(denoiser_args or {}))
        if lr is None:  # stored resolved, so a checkpoint says what it trained with
            self.hparams.lr = DEFAULT_LR[denoiser]
        self.ema = AveragedModel(self.denoiser, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)  # updated by averaging, never by gradients (DDP checks every parameter)
        self.heads = build_heads(parse_names(heads), head_args or {}, num_timesteps)
        # float64 on the CPU on purpose: DDIM reads python floats from it, training gathers per sample.
        self.alpha_bar = linear_alpha_bar(num_timesteps, beta_start, beta_end)
        self._recorder: TestRecorder | None = None
        self._train_features: Tensor | None = None  # raw backbone features of the train split [N, C, h, w], CPU
        self._head_features: Tensor | None = None  # those the heads fit on: the same, or held-out normal images
        self.noise_seed = torch.initial_seed()  # set by seed_everything; kept in checkpoints for resuming
        self.heads_fitted_step: int | None = None  # the global step whose EMA weights the heads were fitted on
        self.heads_fitted_on: list[str] | None = None  # the categories whose normal splits they were fitted on
        self.checkpoint_step: int | None = None  # the global step of the checkpoint this model was loaded from
        self.scoring_changes: list[str] = []  # scoring settings that differ from the loaded checkpoint's
        self.test_metrics: dict | None = None  # the last `test`'s metrics.json content (global rank 0)
        self.test_scores: dict | None = None  # and its merged per-image results (`TestRecorder.payload`)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str, map_location="cpu", **overrides) -> FeatureDDPM:
        """The model of a checkpoint, loaded weights-only (a file that needs arbitrary unpickling is
        refused before anything is built); `overrides` replace saved hyper-parameters (e.g. `heads`).

        The checkpoint holds the backbone weights, so the backbone is built without resolving
        pretrained weights (no hub probe, works offline). Lightning writes `overrides` into the loaded
        hyper-parameters before `on_load_checkpoint` sees them; the stored values travel beside them
        (`STORED_VALUES`, not an argument of the constructor) so that an overridden scoring setting is
        seen as a change and the heads are refitted instead of loaded."""
        stored = load_checkpoint(ckpt_path, mmap=True).get("hyper_parameters") or {}
        kept = {STORED_VALUES: {key: stored[key] for key in overrides if key in stored}}
        with warnings.catch_warnings():  # "pretrained=False, using random weights": the checkpoint's replace them
            warnings.filterwarnings("ignore", message=r"Backbone .*pretrained=False")
            return cls.load_from_checkpoint(
                ckpt_path, map_location=map_location, weights_only=True, pretrained=False, backbone_weights=None,
                **overrides, **kept,
            )

    # ----- features and the denoiser ------------------------------------------------------
    def encode(self, image: Tensor) -> Tensor:
        """Images in [0, 1] [B, 3, H, W] -> standardised features z0 [B, C, h, w].

        On the CPU the backbone sees about two 256 x 256 images at a time: its wide early activations
        then stay in cache, which makes a batch of 32 2.7x faster per image than one big forward. An
        export traces one call for the whole (dynamic) batch."""
        whole = image.device.type != "cpu" or torch.jit.is_tracing()
        parts = [image] if whole else image.split(max(1, CPU_BACKBONE_PIXELS // (image.shape[-2] * image.shape[-1])))
        with torch.no_grad():
            with self.network_autocast(image):
                features = torch.cat([self.backbone(part) for part in parts])  # n x [chunk, C, h, w] -> [B, C, h, w]
            return self.feature_norm(features.float())

    def eps_fn(self, x: Tensor, t: Tensor, return_attention: bool = False):
        """The EMA denoiser's noise prediction (under `network_autocast`), returned in float32; with
        `return_attention` also every attention layer's probabilities [B, heads, N, N] (for RADAR)."""
        with self.network_autocast(x):
            if not return_attention:
                return self.ema.module(x, t).float()
            eps, attention = self.ema.module(x, t, return_attention=True)
        return eps.float(), [a.float() for a in attention]

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

    # ----- fast inference ------------------------------------------------------------------
    inference_bf16 = False  # bf16 autocast of scoring on CUDA; set by `prepare_inference`

    def prepare_inference(
        self, channels_last: bool = True, fold_batchnorm: bool = True, compile: bool = False, bf16: bool = False
    ) -> FeatureDDPM:
        """Ready the model for scoring only (not for training or saving): eval mode; the backbone's
        BatchNorms folded into its convolutions (-20 % backbone time on the CPU); the backbone and EMA
        denoiser weights in the channels-last layout (oneDNN's fast convolutions on CPU, tensor cores
        on CUDA); optionally `torch.compile`d in place; `bf16` autocasts scoring on CUDA (the heads'
        maths stays float32). Returns the model."""
        self.eval()
        if fold_batchnorm:
            self.backbone.fold_batchnorm()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        for network in (self.backbone, self.ema.module):
            network.to(memory_format=layout)
            if compile:
                network.compile()
        self.inference_bf16 = bf16
        return self

    def network_autocast(self, like: Tensor):
        """The precision of the networks when they encode images and when the heads call the denoiser:
        float32, whatever the Trainer's precision, so the features and residuals the heads are fitted on
        (at the end of training, or by `fit_heads`) are computed exactly as the ones they score (under
        `--trainer.precision bf16-mixed` only the training steps run in bf16). bf16 on CUDA only after
        `prepare_inference(bf16=True)`, a deliberate speed-for-exactness trade. The heads' own maths runs
        in float32 (`float32_maths`), the schedule in float64."""
        if self.inference_bf16 and like.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(like.device.type, enabled=False)

    # ----- fit ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before `fit`: have the datamodule compute (or read from its cache) the frozen backbone's
        features of the train and validation splits once, and fit the feature statistics on the
        training features (`--data.feature_cache off` still computes those, but serves images).

        This runs in `setup`, not `on_fit_start`, because the trainer builds the train dataloader
        while configuring the optimizer schedule, before `on_fit_start`.
        """
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "cache_features"):
            raise RuntimeError("FeatureDDPM trains from an AnomalyDataModule (e.g. --data Demo or --data MVTecAD)")
        device = self.trainer.strategy.root_device
        self._train_features = datamodule.cache_features(self.backbone.to(device), device)
        self._head_features = datamodule.head_features
        self.feature_norm.fit(self._train_features)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.diffusion_loss(self._z0(batch), self._step_generator())
        self._check_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size(batch))
        # the schedule's learning rate, logged here rather than by LearningRateMonitor, which refuses a
        # Trainer without a logger (`--trainer.logger false`)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size(batch))
        return loss

    def _step_generator(self) -> torch.Generator:
        """The source of one training step's timesteps and noise, seeded by (noise seed, global
        step, rank): a run resumed from a checkpoint draws exactly what the uninterrupted run drew,
        whatever else consumed the global RNG in between."""
        seed = np.random.SeedSequence([self.noise_seed, self.global_step, self.global_rank]).generate_state(1)[0]
        return torch.Generator(self.device).manual_seed(int(seed))

    def _check_finite(self, loss: Tensor, batch_idx: int) -> None:
        """Stop before a non-finite loss reaches the weights (all ranks decide together under DDP)."""
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return
        callback = self.trainer.checkpoint_callback
        last = (callback.best_model_path if callback else "") or self.trainer.ckpt_path or "none written yet"
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
            f"(epoch {self.current_epoch}, batch {batch_idx}); training stopped before the optimizer step, so no "
            f"weight was changed by it. Last good checkpoint: {last}. Lower --model.lr, use --trainer.precision 32 "
            "or check the data, then resume with `fit --ckpt_path last`."
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["noise_seed"] = self.noise_seed
        checkpoint["heads_fitted_step"] = self.heads_fitted_step
        checkpoint["heads_fitted_on"] = self.heads_fitted_on
        checkpoint[HEAD_CONFIGS] = {name: plain(head.config) for name, head in self.heads.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.noise_seed = checkpoint.get("noise_seed", self.noise_seed)
        self.checkpoint_step = checkpoint.get("global_step")
        # checkpoints written before heads were fitted once per run refitted them at every validation
        # epoch, right before the save: their heads match their weights whenever they were calibrated
        legacy = self.checkpoint_step if "heads_fitted_step" not in checkpoint else None
        self.heads_fitted_step = checkpoint.get("heads_fitted_step", legacy)
        # written before the categories were kept: the heads were fitted at the end of `fit`, on its data
        legacy_categories = "heads_fitted_on" not in checkpoint
        self.heads_fitted_on = trained_categories(checkpoint) if legacy_categories else checkpoint["heads_fitted_on"]
        loaded = checkpoint.get("hyper_parameters") or {}
        stored = {**loaded, **loaded.get(STORED_VALUES, {})}  # as saved, before `from_checkpoint`'s overrides
        self.scoring_changes = scoring_changes(stored, self.hparams) or default_changes(
            checkpoint.get(HEAD_CONFIGS), self.heads
        )
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("heads.")]:  # other heads' states, or stale ones
            if self.scoring_changes or key.split(".")[1] not in self.heads:
                del state[key]
        if self.scoring_changes:  # fresh (unfitted) states of the heads as now configured; fitted before scoring
            state.update({f"heads.{k}": v for k, v in self.heads.state_dict().items()})
            self.heads_fitted_step = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_parameters(self.denoiser)

    def train_z0(self, batch: int = 64) -> Iterator[Tensor]:
        """Standardised features the heads are fitted on (the normal training split, or the images held out
        of training with `--data.head_fit_fraction`), in batches [b, C, h, w] on this device."""
        if self._head_features is None:
            raise RuntimeError("the training features are cached by `fit` or `fit_heads`; call one of them first")
        for start in range(0, len(self._head_features), batch):
            yield self.feature_norm(self._head_features[start : start + batch].to(self.device).float())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out diffusion loss on normal validation images (the heads are not fitted here)."""
        z0 = self._z0(batch)
        generator = torch.Generator(z0.device).manual_seed(batch_idx)
        self.log("val/loss", self.diffusion_loss(z0, generator), batch_size=z0.shape[0], sync_dist=True)

    def on_train_epoch_end(self) -> None:
        """Fit the heads on the current EMA weights when training ends (and every
        `fit_heads_every_n_epochs` epochs if asked), before this epoch's checkpoint is written: the
        checkpoint callback saves after the module's `on_train_epoch_end`."""
        every = self.hparams.fit_heads_every_n_epochs
        if self.training_ends() or (every and (self.current_epoch + 1) % every == 0):
            self.fit_heads(self.trainer.datamodule, cached=True)

    def training_ends(self) -> bool:
        """Whether this epoch is the last one: the step budget or the epoch count is reached, or a
        callback asked to stop."""
        trainer = self.trainer
        if trainer.max_steps is not None and 0 <= trainer.max_steps <= self.global_step:
            return True
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.current_epoch + 1:
            return True
        return trainer.should_stop

    @property
    def weights_step(self) -> int:
        """The global step of the EMA weights this model holds: its checkpoint's, or the current one."""
        return self.checkpoint_step if self.checkpoint_step is not None else self.global_step

    @property
    def heads_current(self) -> bool:
        """Whether the heads were fitted on the EMA weights this model holds: true after `fit_heads`
        and for a checkpoint written at the step its heads were fitted at."""
        return self.heads_fitted_step is not None and self.heads_fitted_step == self.weights_step

    def refit_reason(self, categories: Sequence[str] | None = None) -> str | None:
        """Why the heads must be fitted before scoring `categories` (None: data of unknown categories, e.g.
        `predict`'s images), or None when they can score as they are: fitted on these weights, with these
        scoring settings, on the normal splits of these very categories. A model trained on several
        categories and tested on one of them is so fitted on that category alone (per-category heads)."""
        if not self.heads_current:
            if not self.scoring_changes:
                return HEADS_NOT_CURRENT
            return (
                f"scoring settings differ from the checkpoint's ({', '.join(self.scoring_changes)}); fitting the "
                "heads on the normal training and validation splits before scoring"
            )
        fitted_on = self.heads_fitted_on
        if categories is not None and fitted_on is not None and sorted(categories) != fitted_on:
            return (
                f"its heads were fitted on the categories {', '.join(fitted_on)}, this data holds "
                f"{', '.join(sorted(categories))}; fitting them on this data's normal training and validation "
                "splits before scoring"
            )
        return None

    def fit_heads(self, datamodule, cached: bool = False) -> None:
        """Fit and calibrate every head on this model's EMA weights: normal training statistics
        (`fit_train`), then normalisers, map ranges and thresholds on the normal validation split.

        At the end of `fit` (`cached`) the training and validation features are the ones already in
        memory (under DDP every rank holds all of them, gathered, so every rank fits the same heads);
        otherwise (`test` or `predict` on a checkpoint without current heads, `ablate`) the datamodule
        computes them. The feature standardiser keeps the statistics the denoiser was trained with."""
        if not cached:
            self._train_features = datamodule.cache_features(self.backbone.to(self.device), self.device)
            self._head_features = datamodule.head_features
        was_training = self.ema.training
        self.ema.eval()
        with torch.no_grad(), float32_maths(self.device):
            self._warn_if_not_learned()
            for name, head in self.heads.items():
                if head.needs_train_fit:
                    start = time.perf_counter()
                    head.fit_train(self.train_z0(), self.eps_fn, self.alpha_bar)
                    rank_zero_info(f"heads: {name} fitted on the training features in {time.perf_counter() - start:.1f} s")
            start = time.perf_counter()
            outputs: dict[str, list[HeadOutput]] = {}
            for z0 in self._val_z0(datamodule):
                eps_fn = SharedCalls(self.eps_fn)
                for name, head in self.heads.items():
                    if not isinstance(head, EnsembleHead):
                        outputs.setdefault(name, []).append(head.evaluate(z0, eps_fn, self.alpha_bar).to("cpu"))
            normal = {name: HeadOutput.cat(chunks) for name, chunks in outputs.items()}
            self._calibrate_heads(normal, datamodule.val_images())
        rank_zero_info(f"heads: calibrated on the normal validation split in {time.perf_counter() - start:.1f} s")
        self.ema.train(was_training)
        self.heads_fitted_step = self.weights_step
        self.heads_fitted_on = sorted(datamodule.categories)

    def _warn_if_not_learned(self) -> None:
        """Warn when the EMA denoiser's noise prediction at the last timestep does not correlate with the
        noise (`noise_correlation`): training diverged to a constant output or was far too short, and the
        heads fitted on it score near chance."""
        z0 = next(self.train_z0(batch=16))
        correlation = noise_correlation(z0, self.eps_fn, self.alpha_bar, torch.Generator(self.device).manual_seed(0))
        if correlation >= LEARNED_CORRELATION:
            return
        rank_zero_warn(
            "the denoiser has not learned to predict noise: at the last timestep, where its input is almost pure "
            f"noise, its prediction correlates {correlation:.3f} with the noise (below {LEARNED_CORRELATION}; a "
            f"trained denoiser scores 0.4 and more, a constant output 0). After {self.weights_step} steps at "
            f"--model.lr {self.hparams.lr:g} training has diverged or is far too short, and every head will score "
            "near chance: lower --model.lr (a larger --model.denoiser needs a lower one) or train longer, then fit "
            "again."
        )

    def _val_z0(self, datamodule) -> Iterator[Tensor]:
        """Standardised features of every normal validation image, in batches, on this device. The
        datamodule's own loader, called here, is not sharded by DDP: every rank calibrates on all of them."""
        for batch in datamodule.val_dataloader():
            yield self._z0({k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}).float()

    def _calibrate_heads(self, normal: dict[str, HeadOutput], images: Tensor | None) -> None:
        """Normalisers, map range and decision threshold of every head from its outputs on normal
        validation images (`images`: each output's image, when they are tiles); an ensemble from its
        members' calibrated outputs."""
        hp = self.hparams
        for name, head in self.heads.items():
            if isinstance(head, EnsembleHead):
                normal[name] = head.combine({m: self.heads[m].score(normal[m]) for m in head.members})
            head.calibrate(normal[name], hp.threshold_method, hp.threshold_q, images)

    def configure_optimizers(self):
        hp = self.hparams
        # foreach: each update op once over all parameters, not once per tensor (torch's default only on
        # CUDA); not `fused`, which Lightning refuses with gradient clipping under mixed precision
        optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, foreach=True)
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
    def on_test_start(self) -> None:
        """Fit the heads first if the checkpoint holds none fitted on its weights (one written
        mid-training), or on the test data's categories (`refit_reason`); then score on the fast path
        (`prepare_inference`: BatchNorm folded, channels-last)."""
        reason = self.refit_reason(self.trainer.datamodule.categories)
        if reason is not None:
            if self.trainer.is_global_zero:
                print(f"{self.trainer.ckpt_path or 'this model'}: {reason}")
            self.fit_heads(self.trainer.datamodule)
        self.prepare_inference()

    def on_test_epoch_start(self) -> None:
        keep = self.hparams.latency_images + LATENCY_WARMUP if self.hparams.latency_images else 0
        self._recorder = TestRecorder(
            {name: head.nfe for name, head in self.heads.items()},
            {name: float(head.threshold) for name, head in self.heads.items()},
            keep_images=keep,
            stages={name: [*head.members, name] for name, head in self.heads.items()},
        )

    def heads_for(self, names: Sequence[str] | None) -> list[str]:
        """The configured heads that scoring `names` needs (all when None): an ensemble needs its members."""
        if names is None:
            return list(self.heads)
        unknown = [n for n in names if n not in self.heads]
        if unknown:
            raise ValueError(f"heads {unknown} are not in this model; it has: {', '.join(self.heads)}")
        needed = {m for n in names for m in self.heads[n].members} | set(names)
        return [n for n in self.heads if n in needed]

    def score_batch(
        self,
        image: Tensor,
        timer: StageTimer | None = None,
        heads: Sequence[str] | None = None,
        decide_pixels: bool = True,
    ) -> dict[str, Scores]:
        """Score images [B, 3, H, W] with every head (or those `heads` need), sharing one backbone
        forward; maps at H x W. An ensemble combines the final outputs of the heads before it.
        `decide_pixels=False` skips per-pixel decisions (tiles: they are made on the stitched map).
        Heads scored together share the denoiser calls they make at the same state (`SharedCalls`: `irf`
        and `irf_bank` at one t* cost one call). Runs under `torch.inference_mode` (no autograd
        bookkeeping); the networks under `network_autocast`, the heads in float32."""
        timer = timer or (lambda stage, like: nullcontext())
        names = self.heads_for(heads)
        eps_fn = SharedCalls(self.eps_fn) if len(names) > 1 else self.eps_fn  # one head: nothing to share (export traces it)
        with torch.inference_mode(), float32_maths(image.device):
            with timer("backbone", image):
                z0 = self.encode(image)
            finals, results = {}, {}
            for name in names:
                head = self.heads[name]
                with timer(name, image):
                    if isinstance(head, EnsembleHead):
                        out = head.combine({m: finals[m] for m in head.members})
                    else:
                        out = head.evaluate(z0, eps_fn, self.alpha_bar)
                    score, feature_map = finals[name] = head.score(out)
                    size, blur = image.shape[-2:], head.map_blur(self.hparams.blur_sigma)
                    maps = None if feature_map is None else to_image_map(feature_map, size, blur)
                    results[name] = Scores(score, out.terms, maps)
                    if decide_pixels:
                        self._decided(head, results[name])
        return results

    @staticmethod
    def _decided(head, scores: Scores) -> Scores:
        """`scores` with the head's per-pixel decisions (for image-size maps), if it makes any."""
        if scores.maps is not None:
            scores.pixel_decisions = head.pixel_decisions(scores.maps, is_anomalous(scores.score, float(head.threshold)))
        return scores

    def score_tiled(
        self,
        image: Tensor,
        tile: int,
        overlap: int,
        size: int,
        timer: StageTimer | None = None,
        heads: Sequence[str] | None = None,
    ) -> dict[str, Scores]:
        """Score one large image [3, H, W] tile by tile: tiles resized to `size` as in training,
        tile maps stitched back to [1, H, W]; image score and terms are the max over tiles."""
        boxes = tile_boxes(image.shape[-2], image.shape[-1], tile, overlap)
        tiles = F.interpolate(  # [n, 3, tile, tile] -> [n, 3, size, size], as TileDataset does
            extract_tiles(image, boxes), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        results = {}
        for name, scores in self.score_batch(tiles.clamp(0, 1), timer, heads, decide_pixels=False).items():
            terms = {key: value.amax()[None] for key, value in scores.terms.items()}
            full = None
            if scores.maps is not None:
                tile_maps = F.interpolate(scores.maps[:, None], size=(tile, tile), mode="bilinear", align_corners=False)
                full = stitch(tile_maps[:, 0], boxes, tuple(image.shape[-2:]))[None]  # [n, tile, tile] -> [1, H, W]
            results[name] = self._decided(self.heads[name], Scores(scores.score.amax()[None], terms, full))
        return results

    def score_images(
        self, image: Tensor, timer: StageTimer | None = None, heads: Sequence[str] | None = None
    ) -> dict[str, Scores]:
        """`score_batch`, or tile by tile (one image per batch) when the data asks for tiling."""
        tiling = getattr(self.trainer.datamodule, "tiling", None)
        if tiling is None:
            return self.score_batch(image, timer, heads)
        return self.score_tiled(image[0], *tiling, size=self.trainer.datamodule.image_size, timer=timer, heads=heads)

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Scores]:
        """Score a batch with every head; large images tile by tile when the data asks for it.

        Maps and masks are recorded at the evaluation resolution (the data's image_size); the
        results are returned too, so callbacks (heatmaps) see them in `on_test_batch_end`."""
        results = self.score_images(batch["image"], self._recorder.timer)
        size = (self.trainer.datamodule.image_size,) * 2
        batch = {**batch, "mask": at_resolution(batch["mask"], size, "nearest")}  # [B, 1, H, W]
        for scores in results.values():
            if scores.maps is not None:
                scores.maps = at_resolution(scores.maps[:, None], size, "bilinear")[:, 0]  # [B, H, W]
            if scores.pixel_decisions is not None:
                scores.pixel_decisions = at_resolution(scores.pixel_decisions[:, None].float(), size, "nearest")[:, 0] > 0.5
        self._recorder.add(batch, results)
        return results

    def on_test_epoch_end(self) -> None:
        """Re-score the first test images one at a time, each head alone (with the members it needs), for
        its batch-1 latency, then report. Alone, so a head is never timed as cheaper for a network call
        another head made first."""
        recorder, self._recorder = self._recorder, None
        if len(recorder.kept) > LATENCY_WARMUP:
            recorder.latency = {
                name: batch1_latency(partial(self.score_images, heads=[name]), recorder.kept, warmup=LATENCY_WARMUP)
                for name in self.heads
            }
        self.test_metrics = recorder.finish(self.trainer)
        self.test_scores = recorder.merged  # every rank's per-image scores (rank 0), for plots


def build_heads(names: list[str], head_args: dict[str, dict], num_timesteps: int) -> nn.ModuleDict:
    """The configured heads, in order (an ensemble binds the heads before it); a bad name or argument
    is refused naming its option."""
    unknown = [name for name in [*names, *head_args] if name not in HEADS]
    if unknown:
        raise UsageError(
            f"unknown head(s) {unknown} in --model.heads or --model.head_args; available: {', '.join(sorted(HEADS))}"
        )
    heads = nn.ModuleDict()
    for name in names:
        try:
            heads[name] = build_head(name, num_timesteps=num_timesteps, **head_args.get(name, {}))
            if isinstance(heads[name], EnsembleHead):
                heads[name].bind(dict(list(heads.items())[:-1]))
        except (ValueError, TypeError) as err:
            raise UsageError(f"--model.head_args.{name}: {err}") from None
    return heads


STORED_VALUES = "_stored_values"  # the checkpoint's own values of hyper-parameters `from_checkpoint` overrides
REFIT_OPTIONS = ("threshold_method", "threshold_q")  # besides each head's arguments: they change fitted state


def scoring_changes(stored: dict, current) -> list[str]:
    """The scoring settings of `current` hyper-parameters that differ from a checkpoint's `stored` ones
    in a way that changes fitted head state: a configured head's arguments (or a head the checkpoint
    lacks), the threshold rule. Choosing fewer of the stored heads changes nothing fitted."""
    if not stored:
        return []
    stored_heads, stored_args = parse_names(stored.get("heads", [])), stored.get("head_args") or {}
    changes = []
    for name in parse_names(current["heads"]):
        args = (current.get("head_args") or {}).get(name, {})
        if name not in stored_heads:
            changes.append(f"head {name} is new")
        elif json.dumps(args, sort_keys=True, default=str) != json.dumps(stored_args.get(name, {}), sort_keys=True, default=str):
            changes.append(f"head_args.{name}: {args} (checkpoint: {stored_args.get(name, {})})")
    changes += [f"{o}: {current[o]} (checkpoint: {stored[o]})" for o in REFIT_OPTIONS if o in stored and stored[o] != current[o]]
    return changes


HEAD_CONFIGS = "head_configs"  # checkpoint key: each head's settings, defaults included, when it was saved


def plain(value):
    """`value` as JSON types (tuples as lists, other objects as their text), for the checkpoint and comparison."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def default_changes(stored: dict | None, heads: nn.ModuleDict) -> list[str]:
    """The settings of the configured heads that differ from those a checkpoint's heads were built with,
    though no option asked for it: a default changed in this version of the code since the checkpoint was
    written, so its fitted state may no longer fit the head. Settings that never change a score (a head's
    `neutral_settings`, e.g. a chunk size) are not compared. Nothing to compare for checkpoints written
    before the settings were kept (`stored` None) or for a head the checkpoint lacks (`scoring_changes`)."""
    if stored is None:
        return []
    changes = []
    for name, head in heads.items():
        if name not in stored:
            continue
        current = plain(head.config)
        changes += [
            f"head {name}'s default {key}: {current.get(key)} (checkpoint: {stored[name].get(key)})"
            for key in sorted((set(current) | set(stored[name])) - set(head.neutral_settings))
            if current.get(key) != stored[name].get(key)
        ]
    return changes


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""


def ema_with_warmup(decay: float):
    """EMA update for `AveragedModel` whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    With a fixed 0.999 the average of a short run (a few thousand steps, as on a CPU) would still
    hold much of the random initialisation; the ramp makes it track early training closely.
    """

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, weight)  # as torch's own get_ema_multi_avg_fn does

    return update


def float32_maths(device: torch.device):
    """No autocast inside: the heads' statistics (Gaussians, inversion arithmetic, normalisers) stay
    float32 under mixed precision; their network calls re-enter it through `network_autocast`."""
    return torch.autocast(device.type, enabled=False)


def batch_size(batch: dict) -> int:
    return len(next(iter(batch.values())))
