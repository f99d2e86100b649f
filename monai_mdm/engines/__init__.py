"""Engine pieces: prepare-batches for MDM pretraining and head training, the feature cache, head ensembles."""

from .ensemble import EnsembleCrossEntropy, EnsembleLogits
from .feature_batch import CachedFeaturePrepareBatch, OnlineFeaturePrepareBatch
from .feature_cache import FeatureCache
from .holdout import heldout_cache, holdout_split
from .prepare_batch import CorruptionPrepareBatch

__all__ = [
    "CachedFeaturePrepareBatch",
    "CorruptionPrepareBatch",
    "EnsembleCrossEntropy",
    "EnsembleLogits",
    "FeatureCache",
    "OnlineFeaturePrepareBatch",
    "heldout_cache",
    "holdout_split",
]
