"""InvAD's "reverse scoring" effect: histograms of the latent NLL and of the spatial-norm score
(spread of the per-position norm) for normal vs anomalous test images, across the number of
inversion steps S, from one trained model.

    python experiments/reverse_scoring.py --out results/reverse_scoring      # demo set: trains a short tiny model
    python experiments/reverse_scoring.py --ckpt_path runs --out DIR          # an existing model
    python experiments/reverse_scoring.py --root /data/mvtec --category bottle --out DIR

Prints a table, a row per S: the image AUROC of NLL only, of the spatial norm only and of their
combination (the `likelihood` score), and the median of each score on normal and anomalous images.
Saves it as DIR.md (beside DIR), the histograms DIR/reverse_scoring.png, and what `ablate` writes.
Expected (docs/methods.md section 5): as S grows, NLL reverses (normal images get the lower likelihood:
AUROC below 0.5) while the spatial norm holds.

Without --ckpt_path a short `tiny` model is trained first (one category, 100 epochs = 500 steps at
128 x 128; the output says so). Measured on the shared 2-core CPU, load average 5 to 7, one torch
thread: the default run 2 min 41 s (fabric: NLL AUROC 0.82 at S = 2, 0.39 at S = 50; spatial norm
0.80 to 0.84); with a 256 x 256 fabric model from `benchmark` 1 min 59 s
(NLL 0.90 -> 0.16, spatial norm 0.92 to 0.97).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from harness import add_experiment_args, prepare_experiment

from ad_lightning.ablate import Result, run_ablation, settings_grid
from ad_lightning.evaluation.tables import markdown_table

# title -> (per-image score column, the ablation row's image AUROC of it)
SCORES = {"NLL": ("likelihood_nll", "nll_image_auroc"), "spatial norm": ("likelihood_sp", "sp_image_auroc")}
BINS = 20


def summary(result: Result) -> dict:
    """AUROCs and per-class medians of one S."""
    row = result.row
    line = {"S": row["steps"], **{f"{title} AUROC": row[auroc] for title, (_, auroc) in SCORES.items()}}
    line["combined AUROC"] = row["image_auroc"]
    normal = result.labels == 0
    for title, (column, _) in SCORES.items():
        values = result.scores[column]
        line[f"{title} median normal"] = float(values[normal].median())
        line[f"{title} median anomalous"] = float(values[~normal].median())
    return line


def histograms(results: list[Result], path: Path) -> Path:
    """A row per score (NLL, spatial norm), a column per S: normal vs anomalous histograms on shared bins."""
    fig = Figure(figsize=(3.2 * len(results), 5.6), layout="constrained")
    axes = fig.subplots(len(SCORES), len(results), squeeze=False)
    for column, result in enumerate(results):
        for row, (title, (key, auroc)) in enumerate(SCORES.items()):
            ax, values = axes[row, column], result.scores[key].numpy()
            bins = np.histogram_bin_edges(values, BINS)
            for label, name in ((0, "normal"), (1, "anomalous")):
                ax.hist(values[result.labels.numpy() == label], bins=bins, alpha=0.55, density=True, label=name)
            ax.set_title(f"{title}, S = {result.row['steps']}: AUROC {result.row[auroc]:.3f}", fontsize="small")
    axes[0, 0].legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(parser, epochs=100, steps=[2, 3, 5, 10, 50])
    args = parser.parse_args()
    ckpt_path, datamodule, device = prepare_experiment(args)
    settings = settings_grid(["likelihood"], sorted(args.steps), [0], [])
    overrides = {"latency_images": args.latency_images}
    results, _ = run_ablation(ckpt_path, settings, datamodule, args.out, device, overrides)
    table = [summary(r) for r in results]
    text = f"NLL and spatial norm per S (normal vs anomalous test images)\n\n{markdown_table(table, list(table[0]))}"
    args.out.with_suffix(".md").write_text(text + "\n")  # beside DIR: a committed results file
    figure = histograms(results, args.out / "reverse_scoring.png")
    print(f"\n{text}\n\ntable:  {args.out.with_suffix('.md')}\nfigure: {figure}")


if __name__ == "__main__":
    main()
