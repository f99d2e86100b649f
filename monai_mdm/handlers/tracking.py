"""Extra MLflow records for runs tracked with ``python -m monai.bundle run ... --tracking mlflow``.

MONAI's ``--tracking mlflow`` adds an ``MLFlowHandler`` to the bundle's engine at run time (the loss per
iteration, ``engine.state.metrics`` per epoch). The handlers here add what a bundle knows beyond that: its
settings, its output files, the trained model, and a reachability check of the tracking server. With
tracking off they find no MLflow run and do nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ignite.engine import Engine, Events

from monai_mdm.distributed import all_gather_objects


# engine -> the MLFlowHandler objects in its handler list (filled by MLflowLink.attach, see with_mlflow_link)
_LINKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def with_mlflow_link(handlers: Sequence[Any]) -> list:
    """``handlers`` and, last, an :class:`MLflowLink` to the MONAI ``MLFlowHandler`` objects among them.

    ``--tracking mlflow`` appends its handler to the bundle's handler list at run time, without a config id,
    so the handlers here cannot be given a reference to it in the config. The engine's list passes through
    this function instead (``"train_handlers": "$monai_mdm.handlers.with_mlflow_link(@train#handlers)"``),
    which sees the whole list, the appended handler included.
    """
    from monai.handlers import MLFlowHandler

    handlers = list(handlers or [])
    return [*handlers, MLflowLink([h for h in handlers if isinstance(h, MLFlowHandler)])]


class MLflowLink:
    """Record, for the engine it is attached to, which ``MLFlowHandler`` objects that engine has."""

    def __init__(self, trackers: Sequence[Any]) -> None:
        self.trackers = list(trackers)

    def attach(self, engine: Engine) -> None:
        # the engine attaches every handler when it is built, so the link exists before STARTED
        _LINKED[engine] = self.trackers


def mlflow_handlers(engine: Engine) -> list:
    """MONAI ``MLFlowHandler`` objects of ``engine`` (none when tracking is off or its handler list was not
    passed through :func:`with_mlflow_link`)."""
    return list(_LINKED.get(engine, []))


def _active(engine: Engine) -> list:
    return [h for h in mlflow_handlers(engine) if h.cur_run is not None]


def log_artifact(engine: Engine, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log a file, or a folder's contents, under ``artifact_path`` of every active MLflow run of ``engine``.

    Nothing happens when tracking is off or the path does not exist (e.g. overlays that were not saved).
    """
    path = Path(path)
    for handler in _active(engine):
        if path.is_dir():
            handler.client.log_artifacts(handler.cur_run.info.run_id, str(path), artifact_path)
        elif path.is_file():
            handler.client.log_artifact(handler.cur_run.info.run_id, str(path), artifact_path)


def log_metrics(engine: Engine, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite ``metrics`` to every active MLflow run of ``engine``; names are made valid MLflow keys."""
    import math

    clean = {_metric_key(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if not clean:
        return
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    entries = [Metric(k, v, stamp, step or 0) for k, v in clean.items()]
    for handler in _active(engine):
        handler.client.log_batch(handler.cur_run.info.run_id, metrics=entries)


def _metric_key(name: str) -> str:
    # MLflow keys allow letters, digits, "_-. /:"; face-part names nest with "***" (e.g. "head***eye***iris")
    return re.sub(r"[^\w\-. /:]", "_", str(name).replace("***", "/"))


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
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in self.settings.items()]
        for handler in _active(engine):
            handler.client.log_batch(handler.cur_run.info.run_id, params=params)
            if configs:
                handler.client.log_artifact(handler.cur_run.info.run_id, str(configs[-1]), "config")
        self._done = True


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise ``ConnectionError`` naming ``uri`` when an http(s) tracking server does not answer in ``timeout`` s.

    Any HTTP answer counts as reachable (MLflow reports its own errors quickly); local stores (sqlite) are
    not checked. Without this check MLflow's client retries an unreachable server for minutes.
    """
    if urlsplit(str(uri)).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(str(uri).rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # the server answered, even if not with "OK"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            source = "the MLFLOW_TRACKING_URI environment variable"
        else:
            source = "the tracking_uri setting"
        raise ConnectionError(
            f"MLflow tracking server '{uri}' (from {source}) cannot be reached: {reason}. The run stopped "
            "before its first iteration; the outputs already in its output folder are unchanged. Start the "
            "server, point --tracking_uri (or MLFLOW_TRACKING_URI, which takes precedence) at a running one, "
            "or leave out --tracking mlflow to run without tracking."
        ) from e


class CheckTrackingServer:
    """Stop a tracked run before its first iteration when the MLflow tracking server cannot be reached.

    Runs on ``STARTED`` before MONAI's ``MLFlowHandler`` (which ``--tracking`` appends after the bundle's
    handlers), so neither the tracking client's long retries nor any training step happen. In a multi-process
    run only rank 0 tracks; it shares the outcome so that every rank stops with the same error.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = float(timeout)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        error: ConnectionError | None = None
        try:
            for handler in mlflow_handlers(engine):
                check_tracking_uri(handler.client.tracking_uri, self.timeout)
        except ConnectionError as e:
            error = e
        messages = [m for m in all_gather_objects(None if error is None else str(error)) if m]
        if error is not None:
            raise error
        if messages:
            raise ConnectionError(f"the tracking process (rank 0) stopped the run: {messages[0]}")


class SetTrackedLoss:
    """Tell the ``MLFlowHandler`` that ``--tracking`` adds where the iteration loss is in the engine's output.

    MONAI's default settings read it with ``from_engine(["loss"], first=True)``, which suits decollated
    outputs (a list of dicts) but returns a 1-tuple for the single dict of a ``decollate=False`` trainer
    (the few-shot bundles), which MLflow cannot log.
    """

    def __init__(self, output_transform: Callable[[Any], Any]) -> None:
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for handler in mlflow_handlers(engine):
            handler.output_transform = self.output_transform


class LogArtifacts:
    """When the engine completes, log files or folders (e.g. the final weights) as MLflow artifacts.

    List it after the handler that writes the files, since handlers of one event run in list order.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], artifact_path: str | None = None) -> None:
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self.artifact_path = artifact_path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for path in self.paths:
            log_artifact(engine, path, self.artifact_path)


def save_mlflow_model(
    model_path: str | os.PathLike,
    path: str | os.PathLike,
    window_size: int,
    overlap: float = 0.2,
    spatial_dims: int = 2,
    intensity_range: Sequence[float] = (0.0, 255.0),
) -> Path:
    """Write a segmentation model file as an MLflow pyfunc model folder at ``path`` (see
    ``monai_mdm/inferers/mlflow_model.py``), windows of ``window_size`` (the training crop size) overlapping
    by ``overlap``. 2D: ``predict`` takes (N, H, W, 3) uint8 images and returns (N, H, W) uint8 masks. 3D:
    (N, D, H, W) float32 volumes in the units of ``intensity_range`` (e.g. HU), already on the training
    grid, give (N, D, H, W) uint8 label maps. ``intensity_range`` is mapped to [-1, 1] as in the bundles."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow
    import monai
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if spatial_dims == 2:
        inputs, example = TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3)), np.zeros((1, 16, 16, 3), np.uint8)
    elif spatial_dims == 3:
        inputs, example = TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1)), np.zeros((1, 16, 16, 16), np.float32)
    else:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    outputs = TensorSpec(np.dtype(np.uint8), (-1,) * (spatial_dims + 1))
    signature = ModelSignature(inputs=Schema([inputs]), outputs=Schema([outputs]))
    # explicit requirements: MLflow would otherwise load the model in a subprocess to infer them
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"]
    try:
        requirements.append(f"monai-mdm=={version('monai-mdm')}")
    except PackageNotFoundError:
        pass
    low, high = (float(v) for v in intensity_range)
    mlflow.pyfunc.save_model(
        str(path),
        python_model=importlib.util.find_spec("monai_mdm.inferers.mlflow_model").origin,
        artifacts={"model": str(model_path)},
        # "device" None: cuda when available; load_model(uri, model_config={"device": "cpu"}) overrides it
        model_config={
            "window_size": int(window_size),
            "overlap": float(overlap),
            "spatial_dims": int(spatial_dims),
            "intensity_range": [low, high],
            "device": None,
        },
        signature=signature,
        input_example=example,  # MLflow checks at once that the saved model predicts
        pip_requirements=requirements,
    )
    return Path(path)


class LogSegmentationModel:
    """When training completes, log the saved segmentation model as an MLflow pyfunc model.

    ``mlflow.pyfunc.load_model("runs:/<run id>/model").predict(images)`` then gives class masks (see
    :func:`save_mlflow_model`, which takes ``spatial_dims`` and ``intensity_range`` for volumes). List it
    after ``SaveModel``, which writes ``model_path`` on the same event.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        window_size: int,
        overlap: float = 0.2,
        artifact_path: str = "model",
        spatial_dims: int = 2,
        intensity_range: Sequence[float] = (0.0, 255.0),
    ) -> None:
        self.model_path = Path(model_path)
        self.window_size, self.overlap = int(window_size), float(overlap)
        self.artifact_path = artifact_path
        self.spatial_dims, self.intensity_range = int(spatial_dims), tuple(float(v) for v in intensity_range)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not _active(engine):
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_mlflow_model(
                self.model_path, Path(tmp) / "model", self.window_size, self.overlap,
                self.spatial_dims, self.intensity_range,
            )  # fmt: skip
            log_artifact(engine, folder, self.artifact_path)
