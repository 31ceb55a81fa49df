"""InvAD's central comparison (its Table 4): the reconstruction baseline at perturbation
p in {10, 20, 40, 60, 80} % x steps S against inversion (the `likelihood` head, its combined score
and its NLL-only and spatial-norm-only sub-scores) across the same S, all from one trained model.

    python experiments/recon_vs_inversion.py --out results/recon_vs_inversion      # demo set: trains a short tiny model
    python experiments/recon_vs_inversion.py --ckpt_path runs --out DIR             # an existing model
    python experiments/recon_vs_inversion.py --root /data/mvtec --category bottle --out DIR

Prints two comparisons, a row per S:
(a) at equal NFE: reconstruction noised to t_p = p T and denoised in S steps (NFE = S), against
    inversion in S steps, both as InvAD's code walks it (`official`) and as its text describes it
    (`paper_text`): image AUROC, then pixel AUROC;
(b) InvAD's Table 4 cells: reconstruction on the S-point grid over the schedule, denoised from grid
    index p S (NFE = p S; "-" where p S is not a whole number >= 1, as in the paper), image AUROC and
    NFE per cell, beside inversion at the same S (NFE = S).
Saves them as DIR.md (beside DIR), the figure (a) as DIR/recon_vs_inversion.png, and what
`ablate` writes (DIR/ablation.csv, DIR/runs/<setting>/, the per-metric plots). Expected (InvAD,
docs/methods.md section 8): reconstruction is poor at small S and depends on p; inversion does not.

Without --ckpt_path a short `tiny` model is trained first (one category, 100 epochs = 500 steps at
128 x 128; the output says so). Measured on the shared 2-core CPU, one torch thread (`--threads`'
choice on a busy CPU), load average 4 to 5: the default run (42 settings) 11 min 30 s, 1.7 GB peak
memory (fabric, image AUROC: inversion 0.77 to 0.85, paper-text inversion 0.75 to 0.84,
reconstruction 0.46 to 0.63 at equal NFE and 0.45 to 0.66 in the paper's cells). Before (b) and the
paper-text inversion were added (24 settings), the benchmark's fabric model at 256 x 256
(a fabric model at 256 x 256 from `python -m ad_lightning benchmark`) took 14 min 27 s
under load 5 to 7.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import add_experiment_args, prepare_experiment

from ad_lightning.ablate import Setting, float_list, line_plot, run_ablation, series_by
from ad_lightning.evaluation.tables import markdown_table
from ad_lightning.heads.reconstruction import paper_start_index

PERTURBATIONS = (0.1, 0.2, 0.4, 0.6, 0.8)
INVERSIONS = {"inversion": "official", "inversion paper text": "paper_text"}  # column -> `inversion` argument
TITLES = (
    "(a) equal NFE, image AUROC: reconstruction from t_p = p T in S steps, inversion in S steps (NFE = S)",
    "(a) equal NFE, pixel AUROC",
    (
        "(b) InvAD Table 4's cells, image AUROC (NFE): reconstruction on the S-point grid from grid index p S "
        '(NFE = p S; "-" where p S is not a whole number >= 1), inversion in S steps'
    ),
)
TERMS = {"inversion NLL": "nll_image_auroc", "inversion sp": "sp_image_auroc"}  # official inversion's sub-scores


def inversion(steps: int, variant: str = "official") -> Setting:
    """The likelihood head at S; the default variant keeps ablate's classic setting name and columns."""
    extra = {} if variant == "official" else {"inversion": variant}
    return Setting.of("likelihood", timesteps=0, steps=steps, **extra)


def reconstruction(steps: int, perturbation: float, grid: str = "equal_nfe") -> Setting:
    """The reconstruction head at (S, p); the default grid keeps ablate's classic setting name and columns."""
    extra = {} if grid == "equal_nfe" else {"grid": grid}
    return Setting.of("reconstruction", perturbation=perturbation, steps=steps, **extra)


def settings(steps: list[int], perturbations: list[float]) -> list[Setting]:
    """Every setting both tables need; the paper's empty cells are not scored."""
    out = []
    for s in steps:
        out += [inversion(s, variant) for variant in INVERSIONS.values()]
        out += [reconstruction(s, p) for p in perturbations]
        out += [reconstruction(s, p, "paper") for p in perturbations if paper_start_index(p, s) is not None]
    return out


def equal_nfe_table(
    rows: dict[Setting, dict], steps: list[int], perturbations: list[float], metric: str, with_terms: bool
) -> list[dict]:
    """(a) One row per S: the metric of each reconstruction p (S steps), then inversion (S steps): official,
    its sub-scores (with_terms), paper text."""
    out = []
    for s in steps:
        line = {"S": s} | {f"recon p={p:.0%}": rows[reconstruction(s, p)][metric] for p in perturbations}
        line["inversion"] = rows[inversion(s)][metric]
        if with_terms:
            line |= {name: rows[inversion(s)][key] for name, key in TERMS.items()}
        line["inversion paper text"] = rows[inversion(s, "paper_text")][metric]
        out.append(line)
    return out


def cell(row: dict | None) -> str | None:
    """A Table 4 cell: "0.612 (NFE 2)", None for an empty one."""
    return None if row is None else f"{row['image_auroc']:.3f} (NFE {row['nfe']})"


def paper_table(rows: dict[Setting, dict], steps: list[int], perturbations: list[float]) -> list[dict]:
    """(b) One row per S: image AUROC (NFE) of each of InvAD's (S, p) cells, None where the cell is empty."""
    out = []
    for s in steps:
        line = {"S": s} | {f"recon p={p:.0%}": cell(rows.get(reconstruction(s, p, "paper"))) for p in perturbations}
        line |= {name: cell(rows[inversion(s, variant)]) for name, variant in INVERSIONS.items()}
        out.append(line)
    return out


def figure(rows: dict[Setting, dict], steps: list[int], perturbations: list[float], path: Path) -> Path:
    """Image AUROC over S at equal NFE: a line per reconstruction p, per inversion and sub-score."""
    recon = [rows[reconstruction(s, p)] for p in perturbations for s in steps]
    series = series_by(recon, "perturbation", "steps", "image_auroc", "reconstruction, p = {:.0%}")
    series |= {name: (steps, [rows[inversion(s, v)]["image_auroc"] for s in steps]) for name, v in INVERSIONS.items()}
    series |= {name: (steps, [rows[inversion(s)][key] for s in steps]) for name, key in TERMS.items()}
    return line_plot(path, series, "steps S (NFE)", "image AUROC", log_x=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(parser, epochs=100, steps=[3, 5, 10, 50])
    parser.add_argument("--perturbation", type=float_list, default=list(PERTURBATIONS), help="p values, e.g. 0.1,0.2")
    args = parser.parse_args()
    ckpt_path, datamodule, device = prepare_experiment(args)
    steps, perturbations = sorted(args.steps), args.perturbation
    overrides = {"latency_images": args.latency_images}
    results, _ = run_ablation(ckpt_path, settings(steps, perturbations), datamodule, args.out, device, overrides)
    rows = {r.setting: r.row for r in results}
    tables = (
        equal_nfe_table(rows, steps, perturbations, "image_auroc", with_terms=True),
        equal_nfe_table(rows, steps, perturbations, "pixel_auroc", with_terms=False),
        paper_table(rows, steps, perturbations),
    )
    text = "\n\n".join(f"{title}\n\n{markdown_table(t, list(t[0]))}" for title, t in zip(TITLES, tables))
    args.out.with_suffix(".md").write_text(text + "\n")  # beside DIR: a committed results file
    plot = figure(rows, steps, perturbations, args.out / "recon_vs_inversion.png")
    print(f"\n{text}\n\ntables: {args.out.with_suffix('.md')}\nfigure: {plot}")


if __name__ == "__main__":
    main()
