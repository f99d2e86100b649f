"""Losses: the reconstruction loss of MDM pretraining (whole image or a region) and the summed cross-entropy of a
head ensemble."""

from .ensemble import EnsembleCrossEntropy
from .reconstruction import RegionReconstructionLoss, reconstruction_loss, region_mean

__all__ = ["EnsembleCrossEntropy", "RegionReconstructionLoss", "reconstruction_loss", "region_mean"]
