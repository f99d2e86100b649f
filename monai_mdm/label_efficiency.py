"""Label efficiency: segmentation quality against the number of labelled images, MDM against its baselines.

    python benchmarks/label_efficiency.py                      # embedded GlaS-layout data, the defaults below
    python benchmarks/label_efficiency.py --dataset monuseg    # embedded MoNuSeg-layout data (AJI for nuclei)
    python benchmarks/label_efficiency.py --data /data/GlaS --pretrained runs/pre/models/model_ema.pt

(``python -m monai_mdm.label_efficiency`` is the same command; the demo uses this module's functions.)

For every label budget (number of labelled training images), seed and method it runs the few-shot bundle
exactly as a user would (``monai.bundle.run`` on ``configs/train.json`` plus the method's overlay, then
``configs/evaluate.json`` over ``train.json`` on the full-size test images) and collects the per-image metrics.
The seed draws the labelled images and the training randomness; every method gets the same labelled images for one seed.

Methods:
  unet            MONAI BasicUNet trained from scratch on the labelled images (``train_unet.json``)
  mdm_frozen      the paper's pixel head on frozen MDM decoder features
  mdm_finetune    pretrained MDM UNet + head trained end to end (``finetune.json``)
  random_frozen   the pixel head on features of the same network with random weights (the control)
  ddpm_features   the pixel head on the same pretrained network, fed Gaussian-noised instead of masked images

``--objectives mdm mae umd diffmae ddpm`` pretrains the same tiny network on the same images for the same
iterations once per objective and runs the frozen and fine-tuned methods on each (rows ``mdm_frozen[mae]`` ...);
the few-shot bundle reads each checkpoint's objective and extracts features the way it defines.

Without ``--data`` the embedded synthetic set is written to ``<out>/data``; without ``--pretrained`` the tiny MDM
is pretrained on all of that folder's images, labels unused (``bundles/mdm_pretrain``), as the paper pretrains on
the train and test images. Written to ``--out``: ``runs.csv`` (one row per run), ``summary.csv`` (mean, std, n per
method and budget), ``label_efficiency.png`` (the plot with error bars) and one folder per run. A run whose
folder already holds results for the same settings is not repeated, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from statistics import fmean, pstdev
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_mdm.command_line import UnknownSettingError, check_overrides
from monai_mdm.transforms.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


@dataclass(frozen=True)
class BenchmarkMethod:
    label: str
    overlays: tuple[str, ...] = ()  # config files merged over configs/train.json
    overrides: Mapping[str, Any] = field(default_factory=dict)
    per_objective: bool = False  # run once per pretraining objective of --objectives


METHODS = {
    "unet": BenchmarkMethod("BasicUNet from scratch", ("train_unet.json",)),
    "mdm_frozen": BenchmarkMethod("MDM frozen features + head", per_objective=True),
    "mdm_finetune": BenchmarkMethod("MDM fine-tuned end to end", ("finetune.json",), per_objective=True),
    "random_frozen": BenchmarkMethod("random-init features + head", (), {"pretrained_weights": "random"}),
    "ddpm_features": BenchmarkMethod("DDPM-noise features + head", (), {"corruption": "ddpm"}),
}


def run_id(method: str, objective: str = "mdm") -> str:
    """The name of a method's rows: ``mdm_frozen`` for MDM pretraining, ``mdm_frozen[mae]`` for another objective."""
    return method if objective == "mdm" or not METHODS[method].per_objective else f"{method}[{objective}]"


def method_label(name: str) -> str:
    method, _, objective = name.partition("[")
    label = METHODS[method].label
    return f"{label.replace('MDM ', '')}, {objective.rstrip(']').upper()} pretraining" if objective else label


@dataclass(frozen=True)
class BenchmarkDataset:
    bundle: str
    datalist: str  # function of monai_mdm.data reading the layout
    metrics: tuple[str, str]  # (pixel metric, instance metric) plotted and tabulated


DATASETS = {
    "glas": BenchmarkDataset("mdm_glas_fewshot", "glas_datalist", ("paper_dice", "object_dice")),
    "monuseg": BenchmarkDataset("mdm_monuseg_fewshot", "monuseg_datalist", ("paper_dice", "aji")),
}


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON where it parses (numbers, lists, true/false), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. --set timestep=0), got {item!r}.")
        settings[key] = parse_value(value)
    return settings


def write_embedded_data(dataset: str, root: Path, seed: int) -> Path:
    from monai_mdm.data import synthetic

    if dataset == "glas":
        return synthetic.write_glas(root / "GlaS", n_train=40, n_test_a=4, n_test_b=2, seed=seed)
    return synthetic.write_monuseg(root / "MoNuSeg", n_train=12, n_test=4, seed=seed)


def count_training_images(dataset: str, data: Path) -> int:
    import monai_mdm.data

    return len(getattr(monai_mdm.data, DATASETS[dataset].datalist)(str(data), "train"))


def check_budgets(budgets: Sequence[int], available: int, data: Path) -> None:
    bad = [b for b in budgets if b < 1 or b > available]
    if bad:
        raise ValueError(
            f"--budgets {bad} cannot be drawn from the {available} labelled training images in '{data}': "
            f"each budget must lie in 1..{available}."
        )


def _run_bundle(**kwargs: Any) -> None:
    from monai.bundle import run  # imported late: --help and argument errors stay fast

    run(**kwargs)


def pretrain(data: Path, out: Path, iterations: int, size: int, seed: int, objective: str = "mdm") -> Path:
    """Pretrain the tiny network with ``objective`` on every image under ``data``; an earlier run in ``out`` is
    resumed, not repeated. Every objective gets the same images, iterations, crops and network."""
    _run_bundle(
        config_file=str(BUNDLES / "mdm_pretrain" / "configs" / "train.json"),
        objective=objective,
        dataset_dir=str(data),
        output_dir=str(out),
        max_iterations=iterations,
        image_size=size,
        save_interval=iterations,
        grid_interval=iterations,
        progress_bar=False,
        num_workers=0,
        seed=seed,
    )
    return out / "models" / "model_ema.pt"


def run_one(
    dataset: str, method: str, budget: int, seed: int, data: Path, pretrained: Path, run_dir: Path,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Train and evaluate one method on one budget and seed; returns the mean test metrics and timings.

    The features follow the objective recorded in ``pretrained`` (the bundle reads it back)."""
    ds, m = DATASETS[dataset], METHODS[method]
    configs = BUNDLES / ds.bundle / "configs"
    overrides = {"pretrained_weights": str(pretrained), **settings, **m.overrides}
    record = {"dataset": dataset, "method": method, "budget": budget, "seed": seed, "data": str(data),
              "overlays": list(m.overlays), "overrides": overrides}
    done = run_dir / "benchmark_run.json"
    metrics_file = run_dir / "evaluation" / "metrics.json"
    if done.is_file() and metrics_file.is_file():
        previous = json.loads(done.read_text())
        if previous.get("settings") == record:
            return previous["result"]
    start = time.time()
    _run_bundle(
        config_file=[str(configs / "train.json")] + [str(configs / o) for o in m.overlays],
        dataset_dir=str(data), output_dir=str(run_dir), label_budget=budget, seed=seed, **overrides,
    )
    train_s = time.time() - start
    start = time.time()
    evaluate = [str(configs / "train.json"), str(configs / "evaluate.json")]
    _run_bundle(config_file=evaluate, dataset_dir=str(data), output_dir=str(run_dir), run_name=method)
    eval_s = time.time() - start
    rows = json.loads(metrics_file.read_text())["rows"]
    result: dict[str, Any] = {}
    for key in ds.metrics:
        values = [r[key] for r in rows if r.get(key) is not None]
        result[key] = fmean(values) if values else float("nan")
    result.update(train_s=round(train_s, 1), eval_s=round(eval_s, 1))
    done.write_text(json.dumps({"settings": record, "result": result}, indent=2, default=str))
    return result


def summarise(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, std (population, over seeds) and n per (method, budget), in the order first seen."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), members in groups.items():
        entry: dict[str, Any] = {"method": method, "budget": budget, "n": len(members)}
        for key in metrics:
            values = [float(r[key]) for r in members if not math.isnan(float(r[key]))]
            entry[f"{key}_mean"] = fmean(values) if values else float("nan")
            entry[f"{key}_std"] = pstdev(values) if values else float("nan")
        entry["train_s_mean"] = fmean([float(r["train_s"]) for r in members])
        out.append(entry)
    return out


def format_table(summary: Sequence[Mapping[str, Any]], metrics: Sequence[str], budgets: Sequence[int]) -> str:
    """Methods as rows, budgets as columns, each cell ``mean +- std`` of the first metric then the second."""
    lines = []
    for key in metrics:
        lines.append(f"{key} (mean +- std over seeds) by number of labelled images")
        width = max([16, *(len(s["method"]) + 2 for s in summary)])
        lines.append(f"{'method':<{width}}" + "".join(f"{b:>17}" for b in budgets))
        by = {(s["method"], s["budget"]): s for s in summary}
        for method in dict.fromkeys(s["method"] for s in summary):
            cells = []
            for b in budgets:
                s = by.get((method, b))
                cells.append(f"{s[key + '_mean']:>8.4f} +- {s[key + '_std']:<5.3f}" if s else f"{'-':>17}")
            lines.append(f"{method:<{width}}" + "".join(cells))
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    from monai_mdm.utils import atomic_write

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def plot(path: Path, summary: Sequence[Mapping[str, Any]], metrics: Sequence[str], title: str) -> None:
    """One panel per metric: mean against the number of labelled images, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_mdm.utils import atomic_write

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2))
    for ax, key in zip(axes, metrics):
        for method in dict.fromkeys(s["method"] for s in summary):
            points = sorted((s["budget"], s[f"{key}_mean"], s[f"{key}_std"]) for s in summary if s["method"] == method)
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method_label(method))
        ax.set_xscale("log", base=2)
        budgets = sorted({s["budget"] for s in summary})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("labelled training images")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_mdm.label_efficiency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="glas", help="layout and bundle")
    parser.add_argument("--data", type=Path, help="dataset folder in that layout (default: embedded data)")
    parser.add_argument("--pretrained", type=Path, help="pretrained MDM weights (default: pretrain here)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 4],
                        help="labelled images (default 1 4: fits 30 CPU minutes; 1 2 4 8 draws the whole curve)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=["mdm"], choices=list(OBJECTIVES),
                        help="pretraining objectives compared at the same budget (iterations, images, network); "
                        "the frozen and fine-tuned methods run once per objective")
    parser.add_argument("--pretrain-iterations", type=int, default=300)
    parser.add_argument("--pretrain-size", type=int, default=48, help="pretraining crop size")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the embedded data and pretraining")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train.json setting for every run (e.g. --set timestep=0); repeatable")
    parser.add_argument("--out", type=Path, default=Path("runs/label_efficiency"))
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(args.settings)
    except ValueError as e:
        parser.error(str(e))
    if args.pretrained is not None and not args.pretrained.is_file():
        parser.error(f"--pretrained '{args.pretrained}' is not a file.")
    objectives = list(dict.fromkeys(args.objectives))
    if args.pretrained is not None and len(objectives) > 1:
        parser.error("--pretrained gives the weights of one objective; leave it out to pretrain each of "
                     f"--objectives {' '.join(objectives)} here.")
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data '{args.data}' is not a folder.")

    configs = BUNDLES / DATASETS[args.dataset].bundle / "configs"
    overlays = dict.fromkeys(o for m in args.methods for o in METHODS[m].overlays)
    try:  # a typo in --set would otherwise add an unused setting and every run would use the default
        check_overrides([str(configs / f) for f in ("train.json", *overlays)], settings)
    except UnknownSettingError as e:
        parser.error(f"--set: {e}")

    started = time.time()
    out = args.out
    data = args.data or write_embedded_data(args.dataset, out / "data", args.data_seed)
    try:
        check_budgets(args.budgets, count_training_images(args.dataset, data), data)
    except ValueError as e:
        parser.error(str(e))
    pretrained: dict[str, Path] = {}
    for objective in objectives:
        if args.pretrained is not None:
            pretrained[objective] = args.pretrained
            continue
        print(f"pretraining the tiny network ({objective}) on '{data}' ({args.pretrain_iterations} iterations)",
              flush=True)  # fmt: skip
        t0 = time.time()
        folder = out / ("pretrain" if objective == "mdm" else f"pretrain_{objective}")
        pretrained[objective] = pretrain(data, folder, args.pretrain_iterations, args.pretrain_size, args.data_seed,
                                         objective)  # fmt: skip
        print(f"pretrained: {pretrained[objective]} ({time.time() - t0:.0f} s)", flush=True)
    # methods that do not depend on the objective use the first one's weights (their own, or none at all)
    plan = [(m, o) for m in args.methods for o in (objectives if METHODS[m].per_objective else objectives[:1])]

    metrics = DATASETS[args.dataset].metrics
    rows = []
    for budget in args.budgets:
        for seed in args.seeds:
            for method, objective in plan:
                name = run_id(method, objective)
                run_dir = out / "runs" / f"{name.replace('[', '_').rstrip(']')}_b{budget}_s{seed}"
                result = run_one(args.dataset, method, budget, seed, data, pretrained[objective], run_dir, settings)
                row = {"dataset": args.dataset, "method": name, "objective": objective if METHODS[method].per_objective
                       else "-", "budget": budget, "seed": seed, **result}  # fmt: skip
                rows.append(row)
                cells = "  ".join(f"{k} {result[k]:.4f}" for k in metrics)
                print(f"{name:<20} budget {budget} seed {seed}: {cells}  ({result['train_s']:.0f} s train)",
                      flush=True)
                write_csv(out / "runs.csv", rows)

    summary = summarise(rows, metrics)
    write_csv(out / "summary.csv", summary)
    weights = ", ".join(f"{o}: {p}" for o, p in pretrained.items())
    title = (f"{args.dataset} ({'embedded data' if args.data is None else data}), "
             f"{len(args.seeds)} seeds; pretrained: {weights}")
    plot(out / "label_efficiency.png", summary, metrics, title)
    table = format_table(summary, metrics, args.budgets)
    (out / "summary.txt").write_text(table)
    print("\n" + table)
    print(f"written: {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'label_efficiency.png'} "
          f"({time.time() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
