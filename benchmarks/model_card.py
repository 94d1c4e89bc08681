"""A model card for the model a recipes campaign made: what it was trained on and for how long, its cars_test
top-1 / top-5 as mean ± sd over the campaign's seeds, and the pairs of car models it confuses most.

    python benchmarks/model_card.py benchmarks/results/crops_40ep --recipe fast --shipped fast_s0 \
        --out docs/model_card.md

Reads the campaign's results.json and, in each run folder of the recipe, config.json and evaluate_test.json
(committed) and confusion.csv (evaluate.py's per-class counts; committed by campaigns since crops_40ep_v9, kept
out of git before it: for an older campaign, run this where it ran).
The confused pairs are counted over all seeds of the recipe, both directions together, so a pair is a
property of the recipe rather than of one seed's luck.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

import experiments as X  # the campaign's own readers: options of a run folder, mean ± sd, paths as shown
from images import ImageSize  # noqa: E402  (experiments.py puts the repository on sys.path)


def read_confusion(path: Path) -> tuple[list[str], list[list[int]]]:
    """evaluate.py's confusion.csv: a header of predicted class names, then one row per true class."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, [[int(v) for v in r[1:]] for r in rows[1:]]


def summed(matrices: list[list[list[int]]]) -> list[list[int]]:
    """The seeds' confusion matrices added up, cell by cell."""
    return [[sum(cells) for cells in zip(*rows)] for rows in zip(*matrices)]


def confused_pairs(total: list[list[int]], names: list[str], top: int) -> list[dict]:
    """The unordered class pairs with the most mistakes between them in a (summed) confusion matrix."""
    k = len(names)
    support = [sum(row) for row in total]
    pairs = [{"a": names[i], "b": names[j], "a_as_b": total[i][j], "b_as_a": total[j][i],
              "mistakes": total[i][j] + total[j][i], "support": support[i] + support[j]}
             for i in range(k) for j in range(i + 1, k) if total[i][j] + total[j][i] > 0]
    return sorted(pairs, key=lambda p: (-p["mistakes"], p["a"], p["b"]))[:top]


def same_make_share(total: list[list[int]], names: list[str]) -> float:
    """Of all wrong answers in a (summed) confusion matrix, the share naming a car of the same make (the class
    names' first word: "Audi", "Aston" for Aston Martin)."""
    make = [n.split()[0] for n in names]
    wrong = [(i, j, n) for i, row in enumerate(total) for j, n in enumerate(row) if i != j]
    all_wrong = sum(n for _, _, n in wrong)
    return sum(n for i, j, n in wrong if make[i] == make[j]) / all_wrong if all_wrong else 0.0


def _years(names: list[str]) -> str:
    """The span of model years in the class names ("Audi 100 Sedan 1994" -> 1994)."""
    years = [int(n.split()[-1]) for n in names if n.split() and n.split()[-1].isdigit()]
    return f"{min(years)}-{max(years)}" if years else "unknown"


def model_card(folder: Path, recipe: str, shipped: str, top: int = 10, out: Path | None = None) -> str:
    """The card as markdown; its links are relative to `out` (the file it will be written to)."""
    def link(p: Path) -> str:
        return os.path.relpath(p, (out or Path.cwd() / "card.md").resolve().parent)

    if not (folder / "results.json").exists():
        raise SystemExit(f"error: {folder / 'results.json'} does not exist; pass the folder of a recipes campaign "
                         f"(benchmarks/experiments.py --campaign recipes --out FOLDER)")
    res = json.loads((folder / "results.json").read_text())
    runs = [r for r in res["experiments"] if r["step"] == recipe and r.get("test_top1") is not None]
    if not runs or shipped not in {r["name"] for r in runs}:
        raise SystemExit(f"error: {folder}: no evaluated '{recipe}' runs including {shipped}; finish the campaign "
                         f"first (its command is in {folder / 'results.md'})")
    cfg = json.loads((folder / shipped / "config.json").read_text())
    opts = X.read_options(folder / shipped)  # flat, of this code's config.json schema or an older one
    ev = json.loads((folder / shipped / "evaluate_test.json").read_text())
    eff, me = ev.get("efficiency") or {}, ev["metrics"]
    matrices, names = [], []
    for r in runs:
        p = folder / r["name"] / "confusion.csv"
        if not p.exists():
            raise SystemExit(f"error: {p} is missing (campaigns before crops_40ep_v9 kept it out of git); run this "
                             f"where the campaign ran, or evaluate the run's final.pt again with evaluate.py")
        names, m = read_confusion(p)
        matrices.append(m)
    summary = X.recipe_summary(res["experiments"])[recipe]
    t1, t5, minutes = summary["top1"], summary["top5"], summary["train_min"]
    env, settings = res.get("environment") or {}, res["settings"]
    shipped_row = next(r for r in runs if r["name"] == shipped)
    jobs = settings.get("jobs", 1)
    side = f"{jobs} runs side by side" if jobs > 1 else "one run at a time"
    held_out = (f"{cfg['dataset'].get('val', 0)} held out for validation" if opts.get("val_split") else
                "nothing held out for validation")
    during = "nothing evaluated during training" if opts.get("validate") is False else \
        "the held-out photos scored after each epoch"
    size = ImageSize.of(opts["img_size"]).text
    minutes_text = f"{statistics.mean(minutes):.0f} min" if minutes else "unrecorded time"
    L = [f"# Model card: GhostNet car-model classifier (`--recipe {recipe}`, `{shipped}`)", "",
         f"Names the car model (make, model, year: the {cfg['num_classes']} classes of Stanford Cars) in a photo "
         "of one car, cropped to it. Trained from scratch, no pre-training. Made by "
         f"`python benchmarks/model_card.py {X.show_path(folder)} --recipe {recipe} --shipped {shipped}` from the "
         f"campaign [{folder.name}/results.md]({link(folder / 'results.md')}).",
         "", "## Training", "",
         f"- data: `{cfg['dataset']['root']}`, {settings.get('data_desc', 'copy unrecorded')}, layout "
         f"{cfg['dataset']['layout']}: {cfg['dataset']['train']} photos of cars_train, {held_out}; {during}",
         f"- recipe: `{opts.get('recipe')}` ([docs/recipes.md]({link(X.REPO / 'docs' / 'recipes.md')})), "
         f"{opts['epochs']} epochs at {size} (width x height), batch {opts['batch_size']}, "
         f"{opts['optimizer']} lr {opts['lr']:g}, weight decay {opts['wd']:g}, {opts['scheduler']} schedule, "
         f"EMA {opts.get('ema')}, label smoothing {opts.get('label_smoothing')}, dropout {opts.get('dropout')}, "
         f"augmentation {' + '.join(opts.get('augment') or [])}"
         + (f" (training photos decoded at {opts['train_decode_scale']:g}x the input)"
            if opts.get("train_decode_scale", 1) != 1 else "") + "; evaluated on the central "
         f"{opts.get('test_crop', 1)} of each side",
         f"- time: {minutes_text} of training per run ({env.get('cpu', '?')}, {env.get('threads', '?')} "
         f"thread(s) per run, {side}); the campaign's budget: the study recipe's {settings.get('epochs')} epochs "
         f"at {settings.get('img_size')} px",
         f"- model: {opts['arch']}, {eff.get('params', cfg['num_params']):,} parameters, "
         f"{eff.get('macs', 0) / 1e6:.0f} M multiply-adds per photo, {eff.get('size_mb_fp32', 0):.1f} MB in fp32",
         "", f"## Accuracy on cars_test ({me.get('images', '?'):,} photos, scored once per run)", "",
         "| | runs | top-1 % | top-5 % |", "|---|---|---|---|",
         f"| `--recipe {recipe}`, mean ± sd over seeds | {len(runs)} | {X._mean_sd(t1)} | {X._mean_sd(t5)} |",
         f"| `{shipped}` (seed {opts.get('seed')}), the model this card describes | 1 | "
         f"{100 * shipped_row['test_top1']:.2f} | {100 * shipped_row['test_top5']:.2f} |",
         "", f"Mean accuracy per class of `{shipped}`: {100 * me.get('mean_class_acc', 0):.2f} %.",
         "", f"## The pairs it confuses most (over the {len(runs)} seeds, both directions)", "",
         "| car A | car B | A taken for B | B taken for A | of their photos (all seeds) |", "|---|---|---|---|---|"]
    total = summed(matrices)
    for p in confused_pairs(total, names, top):
        L.append(f"| {p['a']} | {p['b']} | {p['a_as_b']} | {p['b_as_a']} | "
                 f"{p['mistakes']} of {p['support']} ({100 * p['mistakes'] / max(p['support'], 1):.0f} %) |")
    L += ["", "## Limits", "",
          f"- It knows only the {cfg['num_classes']} models of Stanford Cars (model years {_years(names)}); any "
          "other car is named as one of those, with a probability that can still be high.",
          "- It was trained and scored on photos cropped to the car; how it reads a wide scene with a small car "
          "in it was not measured. Crop to the car first.",
          # the card describes one model, so its own figures come first; the recipe's mean says what a retrain gives
          f"- At {100 * shipped_row['test_top1']:.0f} % top-1 (the recipe's seeds: {statistics.mean(t1):.0f} % on "
          f"average) the first answer is often wrong; the top 5 hold the right model "
          f"{100 * shipped_row['test_top5']:.0f} % of the time ({statistics.mean(t5):.0f} %), which is why the app "
          f"shows five. {100 * same_make_share(total, names):.0f} % of the wrong answers (all seeds) name another "
          "model of the same make "
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
    card = model_card(args.folder.resolve(), args.recipe, args.shipped or f"{args.recipe}_s0", args.top,
                      args.out.resolve() if args.out else None)
    if args.out:
        args.out.write_text(card)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
