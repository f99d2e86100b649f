from .checkpoint import RandomStates, StopAtIteration, TrainingCheckpoint, find_latest_checkpoint
from .ema import EMA
from .training import HeldOutEarlyStopping, SaveModel, StopAtStep, StopOnNonFiniteLoss, epochs_for_steps
from .reconstruction_grid import ReconstructionGridSaver, reconstruction_grid
from .segmentation_report import ClassIoUReport, NucleusInstanceWriter, PublishWhenComplete, SegmentationReport
from .tracking import (
    CheckTrackingServer,
    LogArtifacts,
    LogSegmentationModel,
    LogSettings,
    MLflowLink,
    SetTrackedLoss,
    check_tracking_uri,
    log_artifact,
    log_metrics,
    mlflow_handlers,
    save_mlflow_model,
    with_mlflow_link,
)
from .dice_report import DiceReport
from .timing import IterationTimes

__all__ = [
    "CheckTrackingServer",
    "ClassIoUReport",
    "DiceReport",
    "EMA",
    "HeldOutEarlyStopping",
    "IterationTimes",
    "NucleusInstanceWriter",
    "SaveModel",
    "SegmentationReport",
    "LogArtifacts",
    "LogSegmentationModel",
    "LogSettings",
    "MLflowLink",
    "PublishWhenComplete",
    "RandomStates",
    "ReconstructionGridSaver",
    "SetTrackedLoss",
    "StopAtIteration",
    "StopAtStep",
    "StopOnNonFiniteLoss",
    "TrainingCheckpoint",
    "find_latest_checkpoint",
    "check_tracking_uri",
    "epochs_for_steps",
    "log_artifact",
    "log_metrics",
    "mlflow_handlers",
    "reconstruction_grid",
    "save_mlflow_model",
    "with_mlflow_link",
]
