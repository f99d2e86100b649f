"""The whole MDM pipeline on the embedded synthetic data, as one command (the README's main job).

    python -m monai_mdm.demo [--out runs/demo] [--data demo_data]

1. writes the synthetic GlaS set (official layout, no download);
2. pretrains the tiny MDM with ``bundles/mdm_pretrain`` on all its images, labels unused;
3. trains the few-shot pixel head on frozen MDM features with 10% of the training labels
   (``bundles/mdm_glas_fewshot``) and evaluates it on the full-size test images;
4. trains and evaluates a supervised MONAI ``BasicUNet`` from scratch on the same labelled images;
5. prints both score tables side by side and writes ``comparison.json``.

Every step is the bundle a user would run; this module only chains them with the same settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from monai.bundle import run

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "bundles" / "mdm_pretrain" / "configs"
GLAS = REPO / "bundles" / "mdm_glas_fewshot" / "configs"
COLUMNS = ("paper_dice", "paper_iou", "object_dice", "object_hausdorff")


def _step(title: str, fn) -> float:
    print(f"\n=== {title} ===", flush=True)
    start = time.time()
    fn()
    took = time.time() - start
    print(f"--- {title}: {took:.0f} s", flush=True)
    return took


def comparison_table(results: dict[str, dict], budget: dict) -> str:
    """Plain-text table of mean +- std per image for each model."""
    lines = [
        f"GlaS (synthetic) test set, {budget['count']} labelled training images "
        f"({budget['budget']} of the set, seed {budget['seed']}): {', '.join(budget['names'])}",
        f"{'model':<34}" + "".join(f"{c:>22}" for c in COLUMNS),
    ]
    for label, rows in results.items():
        cells = []
        for c in COLUMNS:
            values = [r[c] for r in rows if r.get(c) is not None]
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
            cells.append(f"{mean:>13.4f} +- {std:<6.4f}")
        lines.append(f"{label:<34}" + "".join(cells))
    lines.append("paper_* follow the paper's protocol (binarised maps); object_* are GlaS instance metrics "
                 "(object Hausdorff in pixels, lower is better).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--data", default="demo_data", help="where the synthetic data is written")
    parser.add_argument("--pretrain-iterations", type=int, default=150)
    parser.add_argument("--pretrain-size", type=int, default=48, help="pretraining crop size")
    parser.add_argument("--label-budget", type=float, default=0.1)
    parser.add_argument("--n-train", type=int, default=40, help="synthetic GlaS training images")
    parser.add_argument("--head-steps", type=int, default=None, help="head optimiser steps (default: the bundle's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from monai_mdm.data.synthetic import write_glas

    out, data = Path(args.out), Path(args.data) / "GlaS"
    pretrained = out / "pretrain" / "models" / "model_ema.pt"
    common = dict(dataset_dir=str(data), label_budget=args.label_budget, seed=args.seed)
    timings = {}
    timings["data"] = _step(
        "synthetic GlaS data", lambda: write_glas(data, n_train=args.n_train, n_test_a=4, n_test_b=2, seed=args.seed)
    )
    timings["pretrain"] = _step(
        "MDM pretraining (tiny network, labels unused)",
        lambda: run(
            config_file=str(PRETRAIN / "train.json"),
            dataset_dir=str(data),
            output_dir=str(out / "pretrain"),
            max_iterations=args.pretrain_iterations,
            image_size=args.pretrain_size,
            save_interval=args.pretrain_iterations,
            grid_interval=args.pretrain_iterations,
            progress_bar=False,
            num_workers=0,
            seed=args.seed,
        ),
    )
    for name, configs in (("mdm", [GLAS / "train.json"]), ("unet", [GLAS / "train.json", GLAS / "train_unet.json"])):
        run_dir = out / name
        timings[f"{name}_train"] = _step(
            f"few-shot training: {name}",
            lambda: run(
                config_file=[str(c) for c in configs],
                output_dir=str(run_dir),
                pretrained_weights=str(pretrained),
                **({} if args.head_steps is None else {"max_steps": args.head_steps, "epoch_length": args.head_steps}),
                **common,
            ),
        )
        timings[f"{name}_evaluate"] = _step(
            f"evaluation on full-size test images: {name}",
            lambda: run(
                config_file=str(GLAS / "evaluate.json"), dataset_dir=str(data), output_dir=str(run_dir), run_name=name
            ),
        )
    results = {
        "MDM frozen features + pixel head": json.loads((out / "mdm" / "evaluation" / "metrics.json").read_text())["rows"],
        "supervised BasicUNet from scratch": json.loads((out / "unet" / "evaluation" / "metrics.json").read_text())[
            "rows"
        ],
    }
    budget = json.loads((out / "mdm" / "label_budget.json").read_text())
    table = comparison_table(results, budget)
    print("\n" + table)
    summary = {"budget": budget, "results": results, "timings_s": timings}
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    (out / "comparison.txt").write_text(table + "\n")
    print(f"\nwritten: {out / 'comparison.json'}; total {sum(timings.values()):.0f} s")
    return summary


if __name__ == "__main__":
    main()
