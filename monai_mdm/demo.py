"""The whole MDM pipeline on the embedded synthetic data, as one command (the README's main job).

    python -m monai_mdm.demo [--out runs/demo] [--data demo_data] [--seeds 0 1 2]

1. writes the synthetic GlaS set (official layout, no download);
2. pretrains the tiny MDM with ``bundles/mdm_pretrain`` on all its images, labels unused;
3. on the same 10 % of the training labels (4 images) trains and evaluates, on the full-size test images:
   a MONAI ``BasicUNet`` from scratch, the paper's pixel head on frozen MDM features, and the MDM UNet
   fine-tuned end to end (``bundles/mdm_glas_fewshot`` with ``train_unet.json`` / ``finetune.json``);
4. prints the score table, writes ``comparison.json`` and the plot ``label_efficiency.png``.

Every step is the bundle a user would run, through :mod:`monai_mdm.label_efficiency` (the benchmark that
also sweeps label budgets); this module only chains them with the demo's settings.
"""

from __future__ import annotations

import argparse
import sys
import json
import time
from statistics import fmean, pstdev
from pathlib import Path

from monai_mdm import label_efficiency as le

COLUMNS = ("paper_dice", "paper_iou", "object_dice", "object_hausdorff")
METHODS = ("unet", "mdm_frozen", "mdm_finetune")


def _step(title: str, fn):
    print(f"\n=== {title} ===", flush=True)
    start = time.time()
    result = fn()
    took = time.time() - start
    print(f"--- {title}: {took:.0f} s", flush=True)
    return result, took


def comparison_table(results: dict[str, dict[int, list[dict]]], budget: dict) -> str:
    """Plain-text table per method: with one seed, mean +- std over the test images; with several, the mean
    over test images per seed, then mean +- std over the seeds."""
    seeds = sorted({s for by_seed in results.values() for s in by_seed})
    spread = "test images" if len(seeds) == 1 else f"seeds {seeds}"
    lines = [
        f"GlaS (synthetic) test set, {budget['count']} labelled training images "
        f"({budget['budget']} of the set); mean +- std over {spread}",
        f"{'model':<30}" + "".join(f"{c:>22}" for c in COLUMNS),
    ]
    for method, by_seed in results.items():
        cells = []
        for c in COLUMNS:
            if len(seeds) == 1:
                values = [r[c] for r in by_seed[seeds[0]] if r.get(c) is not None]
            else:
                values = [fmean(r[c] for r in rows if r.get(c) is not None) for rows in by_seed.values()]
            mean, std = fmean(values), pstdev(values)
            cells.append(f"{mean:>13.4f} +- {std:<6.4f}")
        lines.append(f"{le.METHODS[method].label:<30}" + "".join(cells))
    lines.append("paper_* follow the paper's protocol (binarised maps); object_* are GlaS instance metrics "
                 "(object Hausdorff in pixels, lower is better).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_mdm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--data", default="demo_data", help="where the synthetic data is written")
    parser.add_argument("--pretrain-iterations", type=int, default=300)
    parser.add_argument("--pretrain-size", type=int, default=48, help="pretraining crop size")
    parser.add_argument("--label-budget", type=float, default=0.1, help="fraction of the training images")
    parser.add_argument("--n-train", type=int, default=40, help="synthetic GlaS training images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (labelled images, training)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(le.METHODS))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="extra few-shot train.json setting for every model (e.g. --set max_steps=500)")
    args = parser.parse_args(argv)
    try:
        settings = le.parse_settings(args.settings)
    except ValueError as e:
        parser.error(str(e))

    from monai_mdm.data import glas_datalist
    from monai_mdm.data.budget import budget_count
    from monai_mdm.data.synthetic import write_glas

    out, data = Path(args.out), Path(args.data) / "GlaS"
    timings = {}
    _, timings["data"] = _step(
        "synthetic GlaS data", lambda: write_glas(data, n_train=args.n_train, n_test_a=4, n_test_b=2, seed=0)
    )
    pretrained, timings["pretrain"] = _step(
        f"MDM pretraining (tiny network, {args.pretrain_iterations} iterations, labels unused)",
        lambda: le.pretrain(data, out / "pretrain", args.pretrain_iterations, args.pretrain_size, seed=0),
    )
    count = budget_count(args.label_budget, len(glas_datalist(str(data), "train")))
    results: dict[str, dict[int, list[dict]]] = {m: {} for m in args.methods}
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            run_dir = out / (method if len(args.seeds) == 1 else f"{method}_s{seed}")
            result, timings[run_dir.name] = _step(
                f"{le.METHODS[method].label}: train on {count} labelled images (seed {seed}), evaluate",
                lambda: le.run_one("glas", method, count, seed, data, pretrained, run_dir, settings),
            )
            rows.append({"dataset": "glas", "method": method, "budget": count, "seed": seed, **result})
            results[method][seed] = json.loads((run_dir / "evaluation" / "metrics.json").read_text())["rows"]
    budget = json.loads((run_dir / "label_budget.json").read_text())
    budget["budget"] = f"{args.label_budget:g}"
    table = comparison_table(results, budget)
    print("\n" + table)
    summary = le.summarise(rows, le.DATASETS["glas"].metrics)
    le.plot(out / "label_efficiency.png", summary, le.DATASETS["glas"].metrics,
            f"demo: synthetic GlaS, {count} labelled images, seeds {args.seeds}")
    comparison = {"budget": budget, "results": results, "summary": summary, "timings_s": timings}
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    (out / "comparison.txt").write_text(table + "\n")
    print(f"\nwritten: {out / 'comparison.json'}, {out / 'label_efficiency.png'}; total {sum(timings.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
