"""GPU benchmark: training throughput per denoiser size and end-to-end scoring speed per head, one process.

On a lent GPU, from the repository root, one command (nothing is downloaded: the images are rendered, the
backbone weights random):

    PYTHONPATH=. timeout 420 python experiments/bench_gpu.py --out results/bench_gpu_h200.csv

The 7-minute timeout leaves a rerun inside a 15-minute GPU slot. The CSV and its Markdown twin are rewritten
after every row, so a run the timeout stops keeps every row it finished. Rows come in this order: training,
eager scoring (fp32, bf16), compiled scoring (bf16, then fp32), since compilation is the slow, unknown part
(a row's first compiled call took 2 to 6.5 minutes on the project's loaded 2-core CPU). A rerun for what is
missing, e.g. `--compile on --sizes base --out results/bench_gpu_h200_compiled.csv`, on the same machine can
reuse the kernels inductor cached on disk. The CPU smoke run:

    python experiments/bench_gpu.py --sizes tiny --train_steps 3 --score_batch 4 --images 8 --repeats 3 \
        --fit_images 8 --compile off --threads 1

What is measured (denoisers untrained, backbone random unless --pretrained: speed does not depend on weight
values; images already on the device; CUDA synchronised around every timed call):
- training, per size in --sizes: the real step on standardised features encoded once (training reads its
  feature cache, so the number is the denoiser's): `FeatureDDPM.diffusion_loss` under bf16 autocast
  (--train_precision), AdamW, gradient-norm clipping at 1.0 and the EMA update, without Lightning's loop;
  optimizer steps/s and images/s at --train_batch, timed per step after --warmup steps;
- scoring, per head (`likelihood` at S = 3, every other head at its defaults), with the largest denoiser of
  --sizes: `FeatureDDPM.score_batch` from images in [0, 1] (backbone, head, maps at image size, decisions)
  after `prepare_inference`, in fp32 and bf16 (CUDA only), with and without torch.compile: images/s at
  --score_batch (median of --repeats calls) and batch-1 latency (median and p95 ms of --images calls), after
  --warmup calls; `first_call_s` is the first call alone (it holds the compilation);
- peak memory per row: `torch.cuda.max_memory_allocated`, reset before the timed calls; on a CPU the
  process's peak resident memory so far (it cannot be reset).
Target: irf and likelihood (S = 3) at 10x InvAD's 88 images/s, i.e. 880 images/s at 256 px, on an H200.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from ad_lightning.data.demo import DEMO_CATEGORIES, ensure_demo
from ad_lightning.data.images import BadInputError
from ad_lightning.data.mvtec import MVTecAD
from ad_lightning.evaluation.tables import markdown_table, write_csv
from ad_lightning.evaluation.timing import StageTimer, peak_memory_mb
from ad_lightning.heads import HEADS, EnsembleHead
from ad_lightning.lit import FeatureDDPM, parse_names
from ad_lightning.models.registry import DENOISERS

PAPER_IMAGES_PER_S = 88.0  # InvAD's reported scoring throughput
TARGET_IMAGES_PER_S = 10 * PAPER_IMAGES_PER_S
TARGET_HEADS = ("irf", "likelihood")
TARGET_IMAGE_SIZE = 256
HEAD_ARGS = {"likelihood": {"steps": 3}}  # the target's setting, pinned; every other head at its defaults
# radar last: its attention outputs make a second denoiser graph, the costliest compilation after the first
DEFAULT_HEADS = [name for name in ("irf", "likelihood", "reconstruction", "patchcore", "radar") if name in HEADS]
COMPILE = {"both": (False, True), "on": (True,), "off": (False,)}
VAL_FRACTION = 0.25  # share of the normal images held out to calibrate the heads
CUDA_ONLY = "n/a (CUDA only)"
COLUMNS = (
    "kind", "denoiser", "head", "nfe", "batch", "precision", "compile", "images_per_s", "steps_per_s",
    "ms_median", "ms_p95", "first_call_s", "peak_mem_mb", "note",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="data root in the MVTec-AD layout (default: a demo set rendered for the run)")
    parser.add_argument("--category", default="fabric", help="category under the root (demo: fabric, wood, nut)")
    parser.add_argument("--image_size", type=int, default=TARGET_IMAGE_SIZE, help="images are resized to this square")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--sizes", default=",".join(DENOISERS), help="denoiser sizes trained, comma-separated")
    parser.add_argument("--train_batch", type=int, default=64, help="training batch size")
    parser.add_argument("--train_steps", type=int, default=50, help="timed optimizer steps per size")
    parser.add_argument("--train_precision", choices=("bf16", "32"), help="default: bf16 on CUDA, 32 on CPU")
    parser.add_argument("--heads", default=",".join(DEFAULT_HEADS), help="scoring heads, comma-separated")
    parser.add_argument("--score_batch", type=int, default=64, help="batch size of the throughput rows")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per throughput row")
    parser.add_argument("--images", type=int, default=64, help="timed calls (single images) per batch-1 row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls (or steps) before each row")
    parser.add_argument("--fit_images", type=int, default=32, help="normal images fitting the heads (1/4 calibrate)")
    parser.add_argument("--compile", choices=tuple(COMPILE), help="default: both on CUDA, else off")
    parser.add_argument("--pretrained", action="store_true", help="pretrained backbone weights (default: random)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 on a loaded CPU)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_gpu.csv"), help="CSV; the .md goes beside it")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot take effect, naming the option and the fix; resolve device defaults."""
    args.sizes, args.heads = parse_names(args.sizes), parse_names(args.heads)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    args.compile = args.compile or ("both" if cuda else "off")
    args.train_precision = args.train_precision or ("bf16" if cuda else "32")  # CPU bf16: 14x slower per step
    unknown_sizes = [s for s in args.sizes if s not in DENOISERS]
    if not args.sizes or unknown_sizes:
        raise BadInputError(f"--sizes {unknown_sizes or 'is empty'}: choose from {', '.join(DENOISERS)}")
    unknown_heads = [h for h in args.heads if h not in HEADS or h == EnsembleHead.name]
    if not args.heads or unknown_heads:
        valid = ", ".join(sorted(h for h in HEADS if h != EnsembleHead.name))
        raise BadInputError(f"--heads {unknown_heads or 'is empty'}: choose from {valid} (time an ensemble's members)")
    counts = ("train_batch", "train_steps", "score_batch", "repeats", "images", "warmup", "image_size", "threads")
    for name in counts:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BadInputError(f"--{name} {getattr(args, name)} must be a positive integer")
    if args.fit_images < 8:
        raise BadInputError(f"--fit_images {args.fit_images}: at least 8, so that 2 or more calibrate the heads")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.root is None and args.category not in DEMO_CATEGORIES:
        demo = ", ".join(DEMO_CATEGORIES)
        raise BadInputError(f"--category {args.category!r} is not a demo category ({demo}); give --root")


# ----- data and models ---------------------------------------------------------------------------
def load_images(args: argparse.Namespace) -> dict[str, Tensor]:
    """Normal images that fit ("train") and calibrate ("val") the heads, and test images to score
    ("test"), each [N, 3, S, S] in [0, 1]: from --root, or a demo subset rendered for this run."""
    if args.root:
        return read_splits(Path(args.root), args)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        root = ensure_demo(Path(tmp) / "demo", categories=(args.category,), n_train=args.fit_images,
                           n_test_good=4, n_per_defect=1, image_size=args.image_size)  # fmt: skip
        return read_splits(root, args)


def read_splits(root: Path, args: argparse.Namespace) -> dict[str, Tensor]:
    """Up to --fit_images images of each normal split and enough test images for one throughput batch."""
    data = MVTecAD(root, args.category, image_size=args.image_size, val_fraction=VAL_FRACTION)
    data.setup()
    splits = {
        "train": (data.train_dataset, args.fit_images),
        "val": (data.val_dataset, args.fit_images),
        "test": (data.test_dataset, max(args.score_batch, args.images)),
    }
    # per split: n x [3, S, S] -> [n, 3, S, S]
    return {split: torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))]) for split, (ds, n) in splits.items()}


def cycled(items: Tensor, n: int) -> Tensor:
    """`n` items [n, ...] of `items`, taken in turn (repeated when there are fewer)."""
    return items[torch.arange(n) % len(items)]


def new_model(size: str, heads: list[str], pretrained: bool) -> FeatureDDPM:
    with warnings.catch_warnings():  # "pretrained=False, using random weights": on purpose, said in the header
        warnings.filterwarnings("ignore", message=r"Backbone .*pretrained=False")
        return FeatureDDPM(denoiser=size, heads=heads, head_args=HEAD_ARGS, pretrained=pretrained)


@torch.no_grad()
def fit_heads(model: FeatureDDPM, train: Tensor, val: Tensor) -> Tensor:
    """Fit the feature statistics and every head as a finished training run would (statistics on
    `train`, normalisers and thresholds on the held-out `val`); returns the standardised training
    features z0 [N, C, h, w]."""
    model.feature_norm.fit(model.backbone(train))
    z_train, z_val = model.encode(train), model.encode(val)
    hp = model.hparams
    for head in model.heads.values():
        if head.needs_train_fit:
            head.fit_train(z_train.split(16), model.eps_fn, model.alpha_bar)
        head.calibrate(head.evaluate(z_val, model.eps_fn, model.alpha_bar), hp.threshold_method, hp.threshold_q)
    return z_train


# ----- timing ------------------------------------------------------------------------------------
def measure(run: Callable[[Tensor], object], inputs: list[Tensor], warmup: int) -> dict:
    """`run` on each input: the first call timed alone (compilation, kernel selection), the rest of the
    `warmup` calls untimed, every later call timed (median, p95 ms); peak memory over the timed calls."""
    device = inputs[0].device
    first = StageTimer()
    with first("call", inputs[0]):
        run(inputs[0])
    for x in inputs[1:warmup]:
        run(x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StageTimer()
    for x in inputs[warmup:]:
        with timer("call", x):
            run(x)
    stats = timer.summary()["call"]
    return {
        "ms_median": stats["median_ms"],
        "ms_p95": stats["p95_ms"],
        "first_call_s": first.total("call"),
        "peak_mem_mb": peak_memory_mb(device),
    }


def attempt(fields: dict, timing: Callable[[], dict]) -> dict:
    """The row `fields` with its measurements and images/s; when measuring fails (a compilation error,
    out of memory) the error goes to `note` and the run goes on, so one setting does not cost the
    other rows of a short GPU slot (the script still exits with an error at the end)."""
    try:
        measured = timing()
    except Exception as error:  # noqa: BLE001 - reported in the row and in the exit status
        return {**fields, "note": f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}
    return {**fields, **measured, "images_per_s": fields["batch"] * 1000.0 / measured["ms_median"]}


def train_row(size: str, z_train: Tensor, args: argparse.Namespace) -> dict:
    """Optimizer steps/s of one denoiser size: FeatureDDPM's training step without Lightning's loop."""
    model = new_model(size, [], pretrained=False).to(args.device).train()
    params = list(model.denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=model.hparams.lr, weight_decay=model.hparams.weight_decay, foreach=True)
    bf16 = args.train_precision == "bf16"

    def step(z0: Tensor) -> None:
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.diffusion_loss(z0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        model.ema.update_parameters(model.denoiser)

    batch = cycled(z_train, args.train_batch)  # [N, C, h, w] -> [train_batch, C, h, w]
    fields = {"kind": "train", "denoiser": size, "batch": args.train_batch,
              "precision": "bf16" if bf16 else "fp32", "compile": "off"}  # fmt: skip
    row = attempt(fields, partial(measure, step, [batch] * (args.warmup + args.train_steps), args.warmup))
    if "ms_median" in row:
        row["steps_per_s"] = 1000.0 / row["ms_median"]
    return row


def score_rows(
    model: FeatureDDPM, test: Tensor, compiled: bool, precision: str, args: argparse.Namespace
) -> Iterator[dict]:
    """Rows of every head at --score_batch and at batch 1, on a prepared copy of the fitted `model`."""
    common = {"kind": "score", "denoiser": model.hparams.denoiser, "precision": precision}
    settings = [
        {**common, "compile": "on" if compiled else "off", "head": head, "nfe": model.heads[head].nfe, "batch": b}
        for head in args.heads
        for b in (args.score_batch, 1)
    ]
    if precision == "bf16" and args.device.type != "cuda":
        yield from ({**fields, "note": CUDA_ONLY} for fields in settings)
        return
    torch.compiler.reset()  # each compiled copy starts with empty compilation caches
    ready = copy.deepcopy(model).to(args.device).prepare_inference(compile=compiled, bf16=precision == "bf16")
    test = test.to(args.device)
    inputs = {
        args.score_batch: [cycled(test, args.score_batch)] * (args.warmup + args.repeats),
        1: [test[i % len(test)][None] for i in range(args.warmup + args.images)],  # [3, S, S] -> [1, 3, S, S]
    }
    for fields in settings:
        run = partial(ready.score_batch, heads=[fields["head"]])
        yield attempt(fields, partial(measure, run, inputs[fields["batch"]], args.warmup))


# ----- report ------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def header(args: argparse.Namespace, score_size: str) -> list[str]:
    """What was measured, and where."""
    lines = [f"device: {device_name(args.device)}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads"]
    if args.device.type == "cuda":
        lines.append(f"TF32: cuDNN convolutions {torch.backends.cudnn.allow_tf32}, float32 matmul precision "
                     f"'{torch.get_float32_matmul_precision()}'; cudnn.benchmark {torch.backends.cudnn.benchmark}; "
                     "peak_mem_mb: max_memory_allocated over the timed calls")  # fmt: skip
    else:
        lines.append("peak_mem_mb: the process's peak resident memory so far (a CPU's cannot be reset per row)")
    source = args.root or f"the demo set ('{args.category}', rendered for this run)"
    backbone = "pretrained backbone" if args.pretrained else "random backbone"
    precision = "bf16 autocast" if args.train_precision == "bf16" else "fp32"
    return lines + [
        f"images: {source}, {args.image_size} x {args.image_size}, already on the device",
        f"weights: untrained denoisers, {backbone} (speed does not depend on weight values)",
        f"training: {args.train_steps} steps after {args.warmup} warm-up, batch {args.train_batch}, {precision}",
        f"scoring with the '{score_size}' denoiser: batch {args.score_batch} x {args.repeats} calls, "
        + f"batch 1 x {args.images} calls, after {args.warmup} warm-up calls each",
    ]


def target_lines(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """Whether irf and likelihood reach 10x InvAD's throughput, each judged by its fastest batch row."""
    if args.device.type != "cuda":
        return ["CPU run: target not applicable"]
    lines = []
    for head in [h for h in TARGET_HEADS if h in args.heads]:
        batch_rows = [r for r in rows if r["kind"] == "score" and r["head"] == head and r["batch"] == args.score_batch]
        measured = [r for r in batch_rows if r.get("images_per_s")]
        if not measured:
            lines.append(f"target: {head}: no successful batch-{args.score_batch} row")
            continue
        best = max(measured, key=lambda r: r["images_per_s"])
        verdict = "met" if best["images_per_s"] >= TARGET_IMAGES_PER_S else "NOT met"
        setting = f"{best['precision']}, compile {best['compile']}"
        lines.append(
            f"target: {head} >= {TARGET_IMAGES_PER_S:.0f} images/s (10x InvAD's {PAPER_IMAGES_PER_S:.0f}): "
            f"{best['images_per_s']:.0f} ({setting}) -> {verdict}"
        )
    if args.image_size != TARGET_IMAGE_SIZE:
        lines.append(f"(measured at {args.image_size} px; the target is set at {TARGET_IMAGE_SIZE} px)")
    return lines


def save(rows: list[dict], out: Path, lines: list[str]) -> None:
    """The rows as CSV at `out` and as a Markdown table (after the header lines) beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows, COLUMNS)
    text = "\n".join(f"- {line}" for line in lines) + "\n\n" + markdown_table(rows, COLUMNS) + "\n"
    out.with_suffix(".md").write_text(text)


def progress(row: dict) -> str:
    """One line per finished row, so a log cut short still shows how far the run got."""
    names = " ".join(row[k] for k in ("kind", "denoiser", "head") if row.get(k))
    what = f"{names} batch {row['batch']} {row['precision']} compile {row['compile']}"
    if row.get("note"):
        return f"{what}: {row['note']}"
    rate, ms, first = row["images_per_s"], row["ms_median"], row["first_call_s"]
    return f"{what}: {rate:.1f} images/s, {ms:.2f} ms median, first call {first:.1f} s"


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    score_size = max(args.sizes, key=list(DENOISERS).index)
    lines = header(args, score_size)
    print("\n".join(lines), flush=True)
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(progress(row), flush=True)
        save(rows, args.out, lines)

    images = load_images(args)
    model = new_model(score_size, args.heads, args.pretrained).to(args.device).eval()
    z_train = fit_heads(model, images["train"].to(args.device), images["val"].to(args.device))
    model.cpu()  # the fitted original stays off the GPU; each precision / compile setting scores a copy
    print(f"heads fitted on {len(images['train'])} + {len(images['val'])} normal images "
          f"({time.perf_counter() - start:.1f} s since start)", flush=True)  # fmt: skip
    for size in args.sizes:
        record(train_row(size, z_train, args))
    for compiled in COMPILE[args.compile]:
        for precision in ("bf16", "fp32") if compiled else ("fp32", "bf16"):
            for row in score_rows(model, images["test"], compiled, precision, args):
                record(row)
    verdicts = target_lines(rows, args)
    save(rows, args.out, lines + verdicts)
    print("\n" + markdown_table(rows, COLUMNS) + "\n")
    print("\n".join(verdicts))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({time.perf_counter() - start:.0f} s in all)")
    failed = [r for r in rows if str(r.get("note", "")).startswith("failed")]
    if failed:
        sys.exit(f"{len(failed)} row(s) failed; their errors are in the note column of {args.out}")


if __name__ == "__main__":
    main()
