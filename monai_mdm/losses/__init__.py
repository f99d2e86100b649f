"""Losses: the reconstruction loss of MDM pretraining and the summed cross-entropy of a head ensemble."""

from .ensemble import EnsembleCrossEntropy
from .reconstruction import reconstruction_loss

__all__ = ["EnsembleCrossEntropy", "reconstruction_loss"]
