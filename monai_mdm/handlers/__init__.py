from .checkpoint import StopAtIteration, TrainingCheckpoint, find_latest_checkpoint
from .ema import EMA
from .reconstruction_grid import ReconstructionGridSaver, reconstruction_grid
from .tracking import LogSettings, log_artifact, mlflow_handlers

__all__ = [
    "EMA",
    "LogSettings",
    "ReconstructionGridSaver",
    "StopAtIteration",
    "TrainingCheckpoint",
    "find_latest_checkpoint",
    "log_artifact",
    "mlflow_handlers",
    "reconstruction_grid",
]
