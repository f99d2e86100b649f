"""Extra MLflow records for runs tracked with ``python -m monai.bundle run ... --tracking mlflow``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events


def mlflow_handlers(engine: Engine) -> list:
    """MONAI ``MLFlowHandler`` objects attached to ``engine``.

    ``--tracking`` inserts its handler into the bundle at run time, so other handlers cannot be given a
    reference to it in the config; it is found among the engine's registered callbacks instead.
    """
    from monai.handlers import MLFlowHandler

    found = []
    for callbacks in getattr(engine, "_event_handlers", {}).values():
        for entry in callbacks:
            owner = getattr(entry[0], "__self__", None)
            if isinstance(owner, MLFlowHandler) and owner not in found:
                found.append(owner)
    return found


def log_artifact(engine: Engine, path: str, artifact_path: str | None = None) -> None:
    """Log a file to every active MLflow run of ``engine`` (nothing happens when tracking is off)."""
    for handler in mlflow_handlers(engine):
        if handler.cur_run is not None:
            handler.client.log_artifact(handler.cur_run.info.run_id, str(path), artifact_path)


class LogSettings:
    """Record the run's resolved settings as MLflow params once the tracked run has started.

    The values are what the run really used (after command-line overrides and ``$`` expressions), which
    is what one compares between runs. MONAI's tracking also writes the executed config as
    ``<output_dir>/config_<time>.json`` but logs it only when ``output_dir`` is a ``$`` expression; with
    ``config_dir`` set, the newest such file is logged here under ``config/`` whatever form it took.
    """

    def __init__(self, settings: Mapping[str, Any], config_dir: str | Path | None = None) -> None:
        self.settings = {str(k): v for k, v in settings.items()}
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self._done = False

    def attach(self, engine: Engine) -> None:
        # the MLflow run is created on STARTED by a handler attached after this one
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if self._done:
            return
        configs = sorted(self.config_dir.glob("config_*.json")) if self.config_dir is not None else []
        for handler in mlflow_handlers(engine):
            if handler.cur_run is not None:
                handler._log_params({k: str(v)[:500] for k, v in self.settings.items()})
                if configs:
                    handler.client.log_artifact(handler.cur_run.info.run_id, str(configs[-1]), "config")
        self._done = True
