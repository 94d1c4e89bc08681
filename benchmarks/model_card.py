"""A model card for the model a recipes campaign made: what it was trained on and for how long, its cars_test
top-1 / top-5 as mean ± sd over the campaign's seeds, and the pairs of car models it confuses most.

    python benchmarks/model_card.py benchmarks/results/crops_40ep --recipe fast --shipped fast_s0 \
        --out docs/model_card.md

Reads the campaign's results.json and, in each run folder of the recipe, config.json and evaluate_test.json
(committed) and confusion.csv (evaluate.py's per-class counts, kept out of git: run it where the campaign ran).
The confused pairs are counted over all seeds of the recipe, both directions together, so a pair is a
property of the recipe rather than of one seed's luck.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _shown(p: Path) -> str:
    """A path as the repository's commands write it (relative to the repository where it lies inside)."""
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def read_confusion(path: Path) -> tuple[list[str], list[list[int]]]:
    """evaluate.py's confusion.csv: a header of predicted class names, then one row per true class."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, [[int(v) for v in r[1:]] for r in rows[1:]]


def confused_pairs(matrices: list[list[list[int]]], names: list[str], top: int) -> list[dict]:
    """The unordered class pairs with the most mistakes between them, summed over the matrices."""
    k = len(names)
    total = [[sum(m[i][j] for m in matrices) for j in range(k)] for i in range(k)]
    support = [sum(total[i]) for i in range(k)]
    pairs = [{"a": names[i], "b": names[j], "a_as_b": total[i][j], "b_as_a": total[j][i],
              "mistakes": total[i][j] + total[j][i], "support": support[i] + support[j]}
             for i in range(k) for j in range(i + 1, k) if total[i][j] + total[j][i] > 0]
    return sorted(pairs, key=lambda p: (-p["mistakes"], p["a"], p["b"]))[:top]


def same_make_share(matrices: list[list[list[int]]], names: list[str]) -> float:
    """Of all wrong answers, the share naming a car of the same make (the class names' first word: "Audi",
    "Aston" for Aston Martin), summed over the matrices."""
    make = [n.split()[0] for n in names]
    k = len(names)
    wrong = same = 0
    for m in matrices:
        for i in range(k):
            for j in range(k):
                if i != j:
                    wrong += m[i][j]
                    same += m[i][j] if make[i] == make[j] else 0
    return same / wrong if wrong else 0.0


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def model_card(folder: Path, recipe: str, shipped: str, top: int = 10) -> str:
    if not (folder / "results.json").exists():
        raise SystemExit(f"error: {folder / 'results.json'} does not exist; pass the folder of a recipes campaign "
                         f"(benchmarks/experiments.py --campaign recipes --out FOLDER)")
    res = json.loads((folder / "results.json").read_text())
    runs = [r for r in res["experiments"] if r["step"] == recipe and r.get("test_top1") is not None]
    if not runs or shipped not in {r["name"] for r in runs}:
        raise SystemExit(f"error: {folder}: no evaluated '{recipe}' runs including {shipped}; finish the campaign "
                         f"first (its command is in {folder / 'results.md'})")
    cfg = json.loads((folder / shipped / "config.json").read_text())
    opts = {k: v for section in cfg["config"].values() for k, v in section.items()}  # run/model/train/data/augment
    ev = json.loads((folder / shipped / "evaluate_test.json").read_text())
    eff, me = ev.get("efficiency") or {}, ev["metrics"]
    matrices, names = [], []
    for r in runs:
        p = folder / r["name"] / "confusion.csv"
        if not p.exists():
            raise SystemExit(f"error: {p} is missing (kept out of git); run this where the campaign ran, or "
                             f"evaluate the run's final.pt again with evaluate.py")
        names, m = read_confusion(p)
        matrices.append(m)
    t1, t5 = [100 * r["test_top1"] for r in runs], [100 * r["test_top5"] for r in runs]
    minutes = [r["train_wall_s"] / 60 for r in runs if r.get("train_wall_s")]
    env = res.get("environment") or {}
    shipped_row = next(r for r in runs if r["name"] == shipped)
    L = [f"# Model card: GhostNet car-model classifier (`--recipe {recipe}`, `{shipped}`)", "",
         "Names the car model (make, model, year: the 196 classes of Stanford Cars) in a photo of one car, "
         "cropped to it. Trained from scratch, no pre-training. The web app (`serve.py`) and the phone page "
         f"use this model. Made by `python benchmarks/model_card.py {_shown(folder)} --recipe {recipe} "
         f"--shipped {shipped}` from the campaign [{folder.name}/results.md](../{_shown(folder)}/results.md).",
         "", "## Training", "",
         f"- data: `{cfg['dataset']['root']}` ({res['settings'].get('data_desc', '?')}), layout "
         f"{cfg['dataset']['layout']}: all {cfg['dataset']['train']} photos of cars_train, {cfg['num_classes']} "
         f"classes; nothing held out for validation and nothing evaluated during training",
         f"- recipe: `{opts.get('recipe')}` ([docs/recipes.md](recipes.md)), {opts['epochs']} epochs at "
         f"{opts['img_size'][1]}x{opts['img_size'][0]} (width x height), batch {opts['batch_size']}, "
         f"AdamW lr {opts['lr']:g}, weight decay {opts['wd']:g}, {opts['scheduler']} schedule, EMA {opts.get('ema')}, "
         f"label smoothing {opts.get('label_smoothing')}, dropout {opts.get('dropout')}, augmentation "
         f"{' + '.join(opts.get('augment') or [])}; evaluated on the central {opts.get('test_crop')} of each side",
         f"- time: {statistics.mean(minutes):.0f} min of training per run, the study recipe's time for "
         f"{res['settings'].get('epochs')} epochs at {res['settings'].get('img_size')} px beside it ({env.get('cpu', '?')}, "
         f"{env.get('threads', '?')} thread(s) per run, {res['settings'].get('jobs', 1)} runs side by side)",
         f"- model: {opts['arch']}, {eff.get('params', cfg['num_params']):,} "
         f"parameters, {eff.get('macs', 0) / 1e6:.0f} M multiply-adds per photo, "
         f"{eff.get('size_mb_fp32', 0):.1f} MB in fp32",
         "", "## Accuracy on cars_test (1,798 photos, looked at once per run)", "",
         "| | runs | top-1 % | top-5 % |", "|---|---|---|---|",
         f"| `--recipe {recipe}`, mean ± sd over seeds | {len(runs)} | {_mean_sd(t1)} | {_mean_sd(t5)} |",
         f"| `{shipped}` (the model shipped; chosen as seed 0 before any result) | 1 | "
         f"{100 * shipped_row['test_top1']:.2f} | {100 * shipped_row['test_top5']:.2f} |",
         "", f"Mean accuracy per class of `{shipped}`: {100 * me.get('mean_class_acc', 0):.2f} %.",
         "", f"## The pairs it confuses most (over the {len(runs)} seeds, both directions)", "",
         "| car A | car B | A taken for B | B taken for A | of their photos (all seeds) |", "|---|---|---|---|---|"]
    for p in confused_pairs(matrices, names, top):
        L.append(f"| {p['a']} | {p['b']} | {p['a_as_b']} | {p['b_as_a']} | "
                 f"{p['mistakes']} of {p['support']} ({100 * p['mistakes'] / max(p['support'], 1):.0f} %) |")
    L += ["", "## Limits", "",
          "- It knows only the 196 models of Stanford Cars (mostly 2000-2012 cars sold in the US); any other car "
          "is named as the closest of those, with a probability that can still be high.",
          "- It was trained on photos cropped to the car; a wide scene with a small car in it is read worse. "
          "Crop to the car first.",
          f"- At {statistics.mean(t1):.0f} % top-1 the first answer is often wrong; the top 5 hold the right model "
          f"{statistics.mean(t5):.0f} % of the time, which is why the app shows five. "
          f"{100 * same_make_share(matrices, names):.0f} % of its wrong answers name another model of the same make "
          "(body styles and years of one model, badge twins such as Chevrolet and GMC vans count as different).",
          "- Its accuracy was measured on the photos of one dataset; photos from another camera, light or angle "
          "may do worse, and that was not measured."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a recipes campaign's folder (benchmarks/experiments.py --campaign recipes)")
    ap.add_argument("--recipe", default="fast", choices=["study", "fast"])
    ap.add_argument("--shipped", default=None, help="the run whose model is shipped (default: <recipe>_s0)")
    ap.add_argument("--top", type=int, default=10, help="how many confused pairs to list")
    ap.add_argument("--out", type=Path, default=None, help="write the card here (default: print it)")
    args = ap.parse_args(argv)
    card = model_card(args.folder.resolve(), args.recipe, args.shipped or f"{args.recipe}_s0", args.top)
    if args.out:
        args.out.write_text(card)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
