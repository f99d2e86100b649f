"""monai_mdm: Masked Diffusion Model (MDM) pretraining and few-shot segmentation for MONAI."""

from monai_mdm import command_line as _command_line

__version__ = "0.1.0"

_command_line.install()  # only acts under `python -m monai.bundle run` (see monai_mdm.command_line)
