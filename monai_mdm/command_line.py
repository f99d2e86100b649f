"""What a user of ``python -m monai.bundle run`` sees: the real error last, and no misread setting.

MONAI wraps every error raised while a config is evaluated in ``RuntimeError: Failed to evaluate
ConfigExpression ...`` and prints the original message dozens of lines above the bottom. And its command
line accepts any ``--key``: a typo such as ``--max_iteration 3`` adds a new, unused setting and the run trains
with the default, and ``--resume false`` arrives as the (truthy) text ``'false'``.

Importing ``monai_mdm`` under ``python -m monai.bundle run`` (every bundle of the project imports it) therefore
installs :func:`excepthook`, which prints the usual traceback and then the innermost cause as the last lines,
and checks the command line with :func:`check_overrides` before the config is used: a refused setting is
reported as argparse reports a usage error (the message on stderr, exit status 2). Nothing changes when the
bundles are run from Python (``monai.bundle.run(...)``); callers there can use :func:`check_overrides` directly.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_overrides", "excepthook", "install", "parse_bundle_argv", "split_config_files", "UnknownSettingError"]

# arguments that ``monai.bundle run`` consumes itself rather than passing to the config
MONAI_RUN_ARGS = frozenset({
    "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
    "workflow_name", "workflow_type", "properties_path",
})  # fmt: skip
# set to 1 to allow adding settings that the config does not define (e.g. for a ``%`` macro of your own)
ALLOW_NEW_KEYS_ENV = "MONAI_MDM_ALLOW_NEW_SETTINGS"


class UnknownSettingError(ValueError):
    """A command-line setting that the bundle's config does not define, or a boolean given as text."""


def _under_bundle_run(argv: Sequence[str]) -> bool:
    return len(argv) > 1 and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py") and argv[1] == "run"


def _fire_value(text: str) -> Any:
    """The value python-fire gives a command-line word: a Python literal where it parses, else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_bundle_argv(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` pairs after ``run`` as python-fire reads them."""
    pairs: dict[str, Any] = {}
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            continue  # the positional run_id
        key, sep, text = word[2:].partition("=")
        if not sep:
            if i < len(words) and not words[i].startswith("--"):
                text = words[i]
                i += 1
            else:
                pairs[key] = True
                continue
        pairs[key] = _fire_value(text)
    return pairs


def split_config_files(value: Any) -> list[str]:
    if isinstance(value, str):
        value = _fire_value(value) if value.lstrip().startswith("[") else value
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


# settings that became overlay files: the hint says which file to add instead
RETIRED_SETTINGS = {
    "feature_mode": " Features are recomputed on fresh crops by adding the overlay configs/online_features.json "
    "after configs/train.json in --config_file (fine-tuning's configs/finetune.json already does).",
}


def check_overrides(config_files: Sequence[str], overrides: Mapping[str, Any], meta_file: str | None = None) -> None:
    """Refuse settings the configs do not define (naming the closest ones) and booleans given as text.

    ``config_files`` are merged in order as ``monai.bundle run`` merges them; the bundle's
    ``configs/metadata.json`` (or ``meta_file``) counts too, as MONAI adds its keys to the config.

    Raises:
        UnknownSettingError: the message names the setting, the config files and the fix.
    """
    from monai.bundle import ConfigParser

    files = [f for f in config_files if f]
    if not files or not all(os.path.isfile(f) for f in files):
        return  # MONAI reports the missing file itself
    config = ConfigParser.load_config_files(files)  # merged as `monai.bundle run` merges them
    settings = [str(k) for k in config]  # what a typo is compared with (metadata keys are no settings)
    meta = meta_file if meta_file else (str(Path(files[0]).parent / "metadata.json") if files else None)
    if isinstance(meta, str) and os.path.isfile(meta):
        config = {**ConfigParser.load_config_file(meta), **config}
    tracking = overrides.get("tracking")
    if tracking == "mlflow":  # MONAI adds its tracking settings (tracking_uri, ...) to the config
        from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

        config = {**DEFAULT_MLFLOW_SETTINGS["configs"], **config}
    parser = ConfigParser(config)
    names = " + ".join(f"'{f}'" for f in files)
    problems = []
    for key, value in overrides.items():
        if key in MONAI_RUN_ARGS:
            continue
        if key not in parser:
            if os.environ.get(ALLOW_NEW_KEYS_ENV) == "1":
                continue
            close = difflib.get_close_matches(key.split("#")[0], settings, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join('--' + c for c in close)}?" if close else ""
            hint = RETIRED_SETTINGS.get(key, hint)
            problems.append(
                f"--{key} is not a setting of {names}, so it would be ignored and the run would use the "
                f"default.{hint}"
            )
        elif isinstance(parser[key], bool) and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            fixed = value.strip().lower() == "true"
            problems.append(
                f"--{key} {value} arrives as the text '{value}', which Python reads as true. Write --{key} {fixed} "
                "(capitalised) for a boolean."
            )
    if problems:
        allow = f" (To add a setting on purpose, set {ALLOW_NEW_KEYS_ENV}=1.)"
        raise UnknownSettingError("\n".join(p + (allow if "is not a setting" in p else "") for p in problems))


def _raised_by_monai_wrapper(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    where = Path(frames[-1].filename).as_posix() if frames else ""
    return "/monai/bundle/" in where or where.endswith("/monai/utils/module.py")


def _cause(exc: BaseException) -> BaseException:
    """The first exception inside MONAI's config wrappers ("Failed to evaluate ...", "Failed to instantiate ..."):
    the one the project (or the library it called) raised."""
    seen = {id(exc)}
    while _raised_by_monai_wrapper(exc):
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        exc = nxt
    return exc


def excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """The usual traceback, then the cause of MONAI's wrapper as the last lines a user reads."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):  # else a bar is redrawn below
        bar.close()
    traceback.print_exception(exc_type, exc, tb)
    cause = _cause(exc)
    if cause is not exc and not isinstance(cause, KeyboardInterrupt):
        sys.stderr.write(f"\nerror: {type(cause).__name__}: {cause}\n")
        sys.stderr.flush()


def install(argv: Sequence[str] | None = None) -> None:
    """Under ``python -m monai.bundle run``: install :func:`excepthook` and check the command line once."""
    argv = sys.argv if argv is None else argv
    if not _under_bundle_run(argv) or getattr(install, "done", False):
        return
    install.done = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
    pairs = parse_bundle_argv(argv[2:])
    if "config_file" in pairs and "args_file" not in pairs:
        try:
            check_overrides(split_config_files(pairs["config_file"]), pairs, pairs.get("meta_file"))
        except UnknownSettingError as e:  # a usage error, reported the way argparse does: message, exit 2
            sys.stderr.write("".join(f"error: {line}\n" for line in str(e).splitlines()))
            raise SystemExit(2) from None
