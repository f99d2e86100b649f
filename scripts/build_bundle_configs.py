"""Write the few-shot bundles' configs from their layers: one shared base, one small overlay per bundle.

Sources live in ``configs/bundles/``: ``fewshot/`` holds the shared configs (``train.json`` complete, the others
overlays on it, ``inference.json`` complete), ``<bundle>.json`` holds what one bundle changes, per file, as MONAI
config ids (``"train#loss#_target_": ...``), and ``logging.conf`` is every bundle's logging setup.

Why written into each bundle instead of read at run time: a bundle must stay a self-contained folder. A copied or
exported bundle, MONAI Label (which reads ``configs/inference.json`` and ``configs/metadata.json`` alone) and
``monai.bundle run`` see only that folder, and MONAI's ``%file#id`` macro resolves paths against the working
directory, so no include across folders survives a copy. The bundles therefore ship complete files, and
``tests/integration/test_bundle_layers.py`` fails when one differs from what its layers give.

    python scripts/build_bundle_configs.py          # rewrite the bundles' configs
    python scripts/build_bundle_configs.py --check  # exit 1 and name the stale files
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = REPO / "configs" / "bundles"
BUNDLES = REPO / "bundles"
# a value the base leaves for each bundle to set; a generated file that still holds it is refused
UNSET = "<set by the bundle's layer>"
# target file -> the layers it is made of, in order, then the bundle's own section for that file; a layer named
# like a target written before it is that target as written for this bundle (its own section included)
RECIPES = {
    "train.json": ["train.json"],
    "evaluate.json": ["evaluate.json"],
    "online_features.json": ["online_features.json"],
    "finetune.json": ["online_features.json", "finetune.json"],
    "multi_gpu_train.json": ["multi_gpu_train.json"],
    "inference.json": ["inference.json"],
    "train_unet.json": ["online_features.json", "train_unet.json"],
    "inference_wsi.json": ["inference_wsi.json"],
}
OPTIONAL = {"train_unet.json", "inference_wsi.json"}  # written only for bundles whose layer has a section for it
COMPLETE = {"train.json", "inference.json", "inference_wsi.json"}  # the others are overlays, run after train.json
LOGGING_ONLY = ["mdm_pretrain"]  # bundles that take only logging.conf from the layers
WIDTH = 100  # a list of plain values longer than this is written one value per line


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: not valid JSON ({e})") from None


def _apply(config: dict, overlay: dict, complete: bool) -> dict:
    """``overlay`` on ``config`` with MONAI's ``merge_kv`` (ids set nested entries, ``+key`` concatenates lists).

    In an overlay (``complete`` False) an id whose first part the overlay does not hold is kept as it is."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import merge_kv

    parser = ConfigParser(copy.deepcopy(config))
    for key, value in overlay.items():
        if complete or key.split("#")[0].lstrip("+") in config:
            merge_kv(parser, key, copy.deepcopy(value))
        else:  # an id into train.json that this overlay does not hold: it stays for MONAI to apply at run time
            parser.config[key] = copy.deepcopy(value)
    merged = parser.get()
    if not complete:
        return merged
    # a setting the bundle adds joins the settings at the top, before the first component
    new = [k for k, v in merged.items() if k not in config and _is_setting(v)]
    first = next((k for k, v in merged.items() if isinstance(v, dict) and k in config), None)
    if not new or first is None:
        return merged
    ordered: dict = {}
    for key, value in merged.items():
        if key == first:
            ordered.update({k: merged[k] for k in new})
        if key not in new:
            ordered[key] = value
    return ordered


def _is_setting(value) -> bool:
    """A plain value or a list of them, not a component (dict) or a list of components."""
    return not isinstance(value, dict) and not (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def _unset_ids(value, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [i for k, v in value.items() for i in _unset_ids(v, f"{prefix}{k}#")]
    if isinstance(value, list):
        return [i for n, v in enumerate(value) for i in _unset_ids(v, f"{prefix}{n}#")]
    return [prefix.rstrip("#")] if value == UNSET else []


def _format(value, indent: int = 0) -> str:
    """JSON with 4-space indents; lists of plain values stay on one line, as the hand-written configs had them."""
    pad, inner = " " * indent, " " * (indent + 4)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_format(v, indent + 4)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and (
        any(isinstance(v, (dict, list)) for v in value) or indent + len(json.dumps(value)) > WIDTH
    ):
        return "[\n" + ",\n".join(f"{inner}{_format(v, indent + 4)}" for v in value) + f"\n{pad}]"
    return json.dumps(value)


def bundle_files(bundle: str) -> dict[str, str]:
    """Every generated file of ``bundle``: name -> text."""
    files = {"logging.conf": (LAYERS / "logging.conf").read_text()}
    if bundle in LOGGING_ONLY:
        return files
    sections = _load(LAYERS / f"{bundle}.json")
    unknown = set(sections) - set(RECIPES)
    if unknown:
        raise SystemExit(f"error: {LAYERS / f'{bundle}.json'}: sections {sorted(unknown)} name no bundle file")
    built: dict[str, dict] = {}
    for name, layers in RECIPES.items():
        if name in OPTIONAL and name not in sections:
            continue
        config: dict = {}
        for layer in layers:
            part = built[layer] if layer in built else _load(LAYERS / "fewshot" / layer)
            config = _apply(config, part, complete=bool(config) and name in COMPLETE)
        built[name] = config = _apply(config, sections.get(name, {}), complete=name in COMPLETE)
        unset = _unset_ids(config)
        if unset:
            raise SystemExit(f"error: {LAYERS / f'{bundle}.json'}: section {name!r} must set {unset}")
        files[name] = _format(config) + "\n"
    return files


def all_bundles() -> list[str]:
    return sorted(p.stem for p in LAYERS.glob("*.json")) + LOGGING_ONLY


def stale_files() -> list[Path]:
    """The bundle files whose text differs from what their layers give."""
    return [
        BUNDLES / bundle / "configs" / name
        for bundle in all_bundles()
        for name, text in bundle_files(bundle).items()
        if not (BUNDLES / bundle / "configs" / name).is_file()
        or (BUNDLES / bundle / "configs" / name).read_text() != text
    ]


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the files that are out of date")
    args = parser.parse_args(argv)
    stale = stale_files()
    if args.check:
        for path in stale:
            print(f"out of date: {_shown(path)} (run: python scripts/build_bundle_configs.py)")
        return 1 if stale else 0
    for bundle in all_bundles():
        for name, text in bundle_files(bundle).items():
            path = BUNDLES / bundle / "configs" / name
            if path in stale:
                path.write_text(text)
                print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
