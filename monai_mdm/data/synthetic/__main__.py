"""``python -m monai_mdm.data.synthetic``: write the synthetic GlaS and MoNuSeg sets (or the example montages)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .tiles import _summarise, write_demo_data, write_examples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_mdm.data.synthetic",
        description="Write deterministic synthetic GlaS and MoNuSeg data in the official layouts.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder; GlaS/ and MoNuSeg/ go inside")
    parser.add_argument(
        "--examples", action="store_true", help="write only the example montages (docs/images) into --out"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=None, help="training images per data set")
    parser.add_argument(
        "--n-test", type=int, default=None, help="test images per data set (GlaS: testA; testB stays at its default)"
    )
    parser.add_argument("--glas-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--monuseg-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--list", action="store_true", help="print every file written")
    args = parser.parse_args(argv)
    if args.examples:
        for path in write_examples(args.out, seed=args.seed):
            print(path)
        return 0

    glas_kwargs: dict = {}
    monuseg_kwargs: dict = {}
    if args.n_train is not None:
        glas_kwargs["n_train"] = monuseg_kwargs["n_train"] = args.n_train
    if args.n_test is not None:
        glas_kwargs["n_test_a"] = monuseg_kwargs["n_test"] = args.n_test
    if args.glas_size is not None:
        glas_kwargs["size"] = tuple(args.glas_size)
    if args.monuseg_size is not None:
        monuseg_kwargs["size"] = tuple(args.monuseg_size)
    paths = write_demo_data(args.out, seed=args.seed, glas_kwargs=glas_kwargs, monuseg_kwargs=monuseg_kwargs)
    for line in _summarise(paths):
        print(line)
    if args.list:
        for path in paths.values():
            for p in sorted(q for q in path.rglob("*") if q.is_file()):
                print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
