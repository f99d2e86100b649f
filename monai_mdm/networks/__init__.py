"""Networks: the MDM UNet (guided-diffusion compatible) and its presets."""

from .mdm_unet import MDMUNet, timestep_embedding
from .interchange import guided_diffusion_config_to_kwargs, load_pretrained, load_pretrained_unet
from .presets import PRESETS
from .features import MDMFeatureExtractor
from .pixel_head import BlockwiseHead, EnsembleLogits, PixelHeadEnsemble, PixelMLPHead

__all__ = ["MDMUNet", "PRESETS", "guided_diffusion_config_to_kwargs", "load_pretrained_unet", "timestep_embedding"]
__all__ += ["load_pretrained"]
__all__ += ["MDMFeatureExtractor", "PixelMLPHead", "PixelHeadEnsemble", "BlockwiseHead", "EnsembleLogits"]
