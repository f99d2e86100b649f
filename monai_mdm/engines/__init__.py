from .prepare_batch import CorruptionPrepareBatch

__all__ = ["CorruptionPrepareBatch"]
