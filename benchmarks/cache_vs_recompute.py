"""Does caching features cost accuracy? Train the few-shot head both ways on the same data and compare.

    python benchmarks/cache_vs_recompute.py --pretrained runs/demo/pretrain/models/model_ema.pt \
        --data demo_data/GlaS --out runs/cache_vs_recompute

``cached``: features computed once for ``crops_per_image`` random crops per labelled image (fp16), reused
every epoch. ``recompute``: the frozen network runs on a fresh random crop every step, as the reference
does. Both train the same number of steps with the same seed, then the GlaS bundle's evaluation scores
them on the full-size test images. Prints Dice per mode and the wall time of each training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from monai.bundle import run

REPO = Path(__file__).resolve().parents[1]
GLAS = REPO / "bundles" / "mdm_glas_fewshot" / "configs"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="pretrained MDM weights (model_ema.pt)")
    parser.add_argument("--data", default="demo_data/GlaS")
    parser.add_argument("--out", default="runs/cache_vs_recompute")
    parser.add_argument("--label-budget", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=None, help="head optimiser steps (default: the bundle's)")
    parser.add_argument("--crops-per-image", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)

    results: dict[str, list] = {"cached": [], "recompute": []}
    for seed in args.seeds:
        for mode in results:
            out = Path(args.out) / f"{mode}_seed{seed}"
            start = time.time()
            overlays = [] if mode == "cached" else [str(GLAS / "online_features.json")]
            run(
                config_file=[str(GLAS / "train.json"), *overlays],
                dataset_dir=args.data,
                output_dir=str(out),
                pretrained_weights=args.pretrained,
                label_budget=args.label_budget,
                **({} if args.steps is None else {"max_steps": args.steps}),
                crops_per_image=args.crops_per_image,
                seed=seed,
            )
            train_s = time.time() - start
            evaluate = [str(GLAS / "train.json"), str(GLAS / "evaluate.json")]
            run(config_file=evaluate, dataset_dir=args.data, output_dir=str(out), run_name=mode)
            summary = json.loads((out / "evaluation" / "metrics.json").read_text())["summary"]
            results[mode].append(
                {"seed": seed, "train_s": train_s, **{k: v["mean"] for k, v in summary.items()}}
            )
    print(f"\n{'mode':<10}{'seed':>6}{'train s':>10}{'paper_dice':>12}{'object_dice':>13}")
    for mode, rows in results.items():
        for r in rows:
            print(f"{mode:<10}{r['seed']:>6}{r['train_s']:>10.1f}{r['paper_dice']:>12.4f}{r['object_dice']:>13.4f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
