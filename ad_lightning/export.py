"""`python -m ad_lightning export`: one head's scoring graph as an ONNX file that `predict` runs.

    python -m ad_lightning export --ckpt_path CKPT --head likelihood|irf [--out FILE.onnx] [--image_size N]

The graph is the eager one, traced: `FeatureDDPM.score_batch` for one head, image [B, 3, H, W] in
[0, 1] -> (score [B], map [B, H, W]), with the backbone, every DDIM step of the denoiser and the
head's fitted state (feature statistics, Gaussians, normalisers) baked in as constants. The batch
axis is dynamic, the image size fixed. What `predict` needs besides (head, image size, threshold,
map range) is in the file's metadata. Before the file is kept, onnxruntime's scores and maps are
compared with the eager model's on seeded random images.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from ad_lightning.checkpoint import atomic_path, resolve_checkpoint
from ad_lightning.errors import UsageError
from ad_lightning.heads import HEADS
from ad_lightning.inference import DEFAULT_IMAGE_SIZE, ONNX_FORMAT, ONNX_INPUT, ONNX_OUTPUTS, OnnxScorer, fitted_head, load_model
from ad_lightning.lit import FeatureDDPM

OPSET = 17
VERIFY_IMAGES = 2
VERIFY_TOLERANCE = 1e-4  # max |onnx - eager|, relative to max(1, |eager|)


class ScoringGraph(nn.Module):
    """One head's scoring graph for tracing: image [B, 3, H, W] -> (score [B], map [B, H, W]).

    It calls `FeatureDDPM.score_batch`, so the exported maths is the eager maths."""

    def __init__(self, model: FeatureDDPM, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.model.score_batch(image, heads=[self.head], decide_pixels=False)[self.head]
        return scores.score, scores.maps


def exportable_heads() -> list[str]:
    """The heads whose scoring is plain tensor maths (no seeded noise field, no scikit-learn): `Head.exportable`."""
    return [name for name, head in HEADS.items() if getattr(head, "exportable", False)]


def check_exportable(head: str, source: str) -> None:
    """Refuse a head that has no ONNX graph, naming the ones that do."""
    if head not in exportable_heads():
        raise UsageError(
            f"head {head!r} cannot be exported to ONNX; exportable heads: {', '.join(exportable_heads())} "
            "(reconstruction draws a seeded noise field, radar and the pooled detectors score with scikit-learn); "
            f"score {head!r} with the checkpoint: `python -m ad_lightning predict --ckpt_path {source} --head {head}`"
        )


def export_onnx(model: FeatureDDPM, head: str, out: Path, image_size: int, source: str = "") -> dict[str, float]:
    """Trace `head`'s scoring graph (model on the CPU) at `image_size` into `out` (ONNX, metadata for
    `predict`), check it against the eager model and return the largest differences {"score", "map"}.
    The file appears only once it passed the check."""
    check_exportable(head, source)
    fitted_head(model, head, source)  # in the model, and calibrated
    graph = ScoringGraph(model.eval(), head)
    probe = torch.rand(VERIFY_IMAGES, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with atomic_path(out) as partial:  # removed unless every step below succeeds
        trace(graph, probe, partial)
        write_metadata(partial, model, head, image_size, source)
        differences = compare(graph, OnnxScorer.open(partial), probe)
    return differences


def trace(graph: ScoringGraph, probe: Tensor, path: Path) -> None:
    """torch.onnx's TorchScript exporter: it runs the eager code once, so Python-side decisions (the
    DDIM grid's floats, fitted-state checks) become constants; the batch axis stays dynamic.
    (The torch.export route refuses those checks: they branch on buffer values.)"""
    with warnings.catch_warnings():  # those constants are intended
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # a slice left unfolded
        torch.onnx.export(
            graph, (probe,), str(path), dynamo=False, opset_version=OPSET, input_names=[ONNX_INPUT],
            output_names=ONNX_OUTPUTS, dynamic_axes={name: {0: "batch"} for name in [ONNX_INPUT, *ONNX_OUTPUTS]},
        )  # fmt: skip


def write_metadata(path: Path, model: FeatureDDPM, head: str, image_size: int, source: str) -> None:
    """Store what `predict` needs in the ONNX file's metadata_props."""
    fitted = model.heads[head]
    props = {
        "format": ONNX_FORMAT,
        "head": head,
        "image_size": str(image_size),
        "threshold": repr(float(fitted.threshold)),
        "map_low": repr(float(fitted.map_low)),
        "map_high": repr(float(fitted.map_high)),
        "nfe": str(fitted.nfe),
        "checkpoint": source,
    }
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def compare(graph: ScoringGraph, scorer: OnnxScorer, images: Tensor) -> dict[str, float]:
    """Max |onnx - eager| of scores and maps on `images`; raises when one is off by more than the tolerance."""
    score, maps = graph(images)
    exported = scorer(images)
    differences = {}
    for name, eager, onnx_value in (("score", score, exported.score), ("map", maps, exported.maps)):
        difference = float((onnx_value - eager).abs().max())
        if not difference <= VERIFY_TOLERANCE * max(1.0, float(eager.abs().max())):
            raise RuntimeError(
                f"the exported {graph.head} graph differs from the eager model by {difference:.3g} on its {name}; "
                "the export was not kept (please report this with the checkpoint)"
            )
        differences[name] = difference
    return differences


def default_out(ckpt_path: str, head: str) -> Path:
    """`<checkpoint folder>/<checkpoint stem>_<head>.onnx`, e.g. runs/version_0/checkpoints/last_irf.onnx."""
    ckpt = Path(ckpt_path)
    return ckpt.with_name(f"{ckpt.stem}_{head}.onnx")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ad_lightning export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file, or a directory (its newest *.ckpt)")
    parser.add_argument("--head", required=True, help=f"the head to export: {' or '.join(exportable_heads())}")
    parser.add_argument("--out", type=Path, help="the ONNX file (default: <checkpoint>_<head>.onnx beside it)")
    parser.add_argument("--image_size", type=int, help="N x N input (default: the training image size)")
    args = parser.parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image_size {args.image_size} must be positive")
    return args


def main(argv: list[str]) -> int:
    """Run `export`; prints the file and the measured onnx-vs-eager differences."""
    args = parse_args(argv)
    check_exportable(args.head, args.ckpt_path)
    ckpt_path = resolve_checkpoint(args.ckpt_path)
    model, data_hparams = load_model(ckpt_path, torch.device("cpu"))
    if data_hparams.get("tile_size") is not None:
        raise UsageError(
            f"{ckpt_path} was trained on tiles; an export scores whole images at one size. Score it with the "
            f"checkpoint: `python -m ad_lightning predict --ckpt_path {ckpt_path} --head {args.head}`"
        )
    size = args.image_size or data_hparams.get("image_size") or DEFAULT_IMAGE_SIZE
    out = args.out or default_out(ckpt_path, args.head)
    differences = export_onnx(model, args.head, out, size, source=ckpt_path)
    print(
        f"exported: {out} (head {args.head}, {size} x {size} images, NFE {model.heads[args.head].nfe}); "
        f"max |onnx - eager| on {VERIFY_IMAGES} random images: score {differences['score']:.2g}, "
        f"map {differences['map']:.2g}"
    )
    return 0
