"""monai_mdm: Masked Diffusion Model (MDM) pretraining and few-shot segmentation for MONAI."""

__version__ = "0.1.0"
