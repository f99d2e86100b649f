from .prepare_batch import CorruptionPrepareBatch

__all__ = ["CorruptionPrepareBatch"]

from .feature_batch import CachedFeaturePrepareBatch, OnlineFeaturePrepareBatch
from .feature_cache import FeatureCache

__all__ += ["FeatureCache", "CachedFeaturePrepareBatch", "OnlineFeaturePrepareBatch"]
