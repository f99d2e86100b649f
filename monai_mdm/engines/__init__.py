"""Engine pieces: the prepare-batches that turn a batch into an MDM pretraining step or into pixel-head inputs."""

from .feature_batch import CachedFeaturePrepareBatch, OnlineFeaturePrepareBatch
from .prepare_batch import ObjectiveLoss, ObjectivePrepareBatch

__all__ = ["CachedFeaturePrepareBatch", "ObjectiveLoss", "ObjectivePrepareBatch", "OnlineFeaturePrepareBatch"]
