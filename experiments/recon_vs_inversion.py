"""InvAD's central comparison (its Table 4): the reconstruction baseline at perturbation
p in {10, 20, 40, 60, 80} % x steps S against inversion (the `likelihood` head, its combined score
and its NLL-only and spatial-norm-only sub-scores) across the same S, all from one trained model.

    python experiments/recon_vs_inversion.py --out results/recon_vs_inversion      # demo set: trains a short tiny model
    python experiments/recon_vs_inversion.py --ckpt_path runs --out DIR             # an existing model
    python experiments/recon_vs_inversion.py --root /data/mvtec --category bottle --out DIR

Prints the image AUROC table (a row per S) and the pixel AUROC table; saves them as
DIR/recon_vs_inversion.md, the figure DIR/recon_vs_inversion.png, and what `ablate` writes
(DIR/ablation.csv, DIR/runs/<setting>/, the per-metric plots). Expected (InvAD, docs/methods.md section 8):
reconstruction is poor at small S and depends on p; inversion does not.

Without --ckpt_path a short `tiny` model is trained first (one category, 100 epochs = 500 steps at
128 x 128; the output says so). Measured on the shared 2-core CPU, load average 5 to 7, one torch
thread (`--threads`' choice on a busy CPU): the default run 6 min 34 s (fabric: inversion 0.76 to
0.85 image AUROC, reconstruction 0.46 to 0.64); with the benchmark's fabric model, 256 x 256
(`--ckpt_path results/demo/fabric/fit`, from `python -m ad_lightning benchmark`), 14 min 27 s.
"""

from __future__ import annotations

import argparse

from harness import add_experiment_args, prepare_experiment

from ad_lightning.ablate import float_list, line_plot, run_ablation, series_by, settings_grid
from ad_lightning.evaluation.tables import markdown_table

PERTURBATIONS = (0.1, 0.2, 0.4, 0.6, 0.8)
INVERSION = {"inversion": "image_auroc", "inversion NLL": "nll_image_auroc", "inversion sp": "sp_image_auroc"}


def table(rows: list[dict], metric: str, with_terms: bool) -> list[dict]:
    """One row per S: the metric of each reconstruction p, then inversion (and its sub-scores' image AUROC)."""
    out = []
    for steps in dict.fromkeys(r["steps"] for r in rows):
        line = {"S": steps}
        for r in sorted((r for r in rows if r["steps"] == steps), key=lambda r: r["head"] != "reconstruction"):
            if r["head"] == "reconstruction":
                line[f"recon p={r['perturbation']:.0%}"] = r[metric]
            else:
                line["inversion"] = r[metric]
                if with_terms:
                    line["inversion NLL"], line["inversion sp"] = r["nll_image_auroc"], r["sp_image_auroc"]
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(parser, epochs=100, steps=[3, 5, 10, 50])
    parser.add_argument("--perturbation", type=float_list, default=list(PERTURBATIONS), help="p values, e.g. 0.1,0.2")
    args = parser.parse_args()
    ckpt_path, datamodule, device = prepare_experiment(args)
    settings = settings_grid(["likelihood", "reconstruction"], args.steps, [0], args.perturbation)
    overrides = {"latency_images": args.latency_images}
    results, _ = run_ablation(ckpt_path, settings, datamodule, args.out, device, overrides)
    rows = sorted((r.row for r in results), key=lambda r: r["steps"])
    image, pixel = table(rows, "image_auroc", with_terms=True), table(rows, "pixel_auroc", with_terms=False)
    text = "\n\n".join(
        f"{title} (a row per number of steps S = NFE)\n\n{markdown_table(t, list(t[0]))}"
        for title, t in (("image AUROC", image), ("pixel AUROC", pixel))
    )
    (args.out / "recon_vs_inversion.md").write_text(text + "\n")
    likelihood = [r for r in rows if r["head"] == "likelihood"]
    reconstruction = [r for r in rows if r["head"] == "reconstruction"]
    series = series_by(reconstruction, "perturbation", "steps", "image_auroc", "reconstruction, p = {:.0%}")
    series |= {name: ([r["steps"] for r in likelihood], [r[key] for r in likelihood]) for name, key in INVERSION.items()}
    figure = line_plot(args.out / "recon_vs_inversion.png", series, "steps S (NFE)", "image AUROC", log_x=True)
    print(f"\n{text}\n\ntables: {args.out / 'recon_vs_inversion.md'}\nfigure: {figure}")


if __name__ == "__main__":
    main()
