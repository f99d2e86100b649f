from .checkpoint import StopAtIteration, TrainingCheckpoint, find_latest_checkpoint
from .ema import EMA
from .training import EarlyStopOnLoss, SaveModel
from .reconstruction_grid import ReconstructionGridSaver, reconstruction_grid
from .segmentation_report import ClassIoUReport, SegmentationReport
from .tracking import LogSettings, log_artifact, mlflow_handlers
from .dice_report import DiceReport

__all__ = [
    "ClassIoUReport",
    "DiceReport",
    "EMA",
    "EarlyStopOnLoss",
    "SaveModel",
    "SegmentationReport",
    "LogSettings",
    "ReconstructionGridSaver",
    "StopAtIteration",
    "TrainingCheckpoint",
    "find_latest_checkpoint",
    "log_artifact",
    "mlflow_handlers",
    "reconstruction_grid",
]
