"""Data sets: readers for GlaS, MoNuSeg, the face sets and NIfTI volumes, embedded synthetic demo data, and the
few-shot head's data (the feature cache and the held-out split), whole-slide reading and label pyramids."""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; resolved on first access so that ``python -m monai_mdm.data.synthetic``
# does not import its own module twice
_EXPORTS = {
    "AtomicNibabelWriter": "volumes",
    "CELEBA19_CLASSES": "faces",
    "FFHQ34_CLASSES": "faces",
    "FeatureCache": "feature_cache",
    "ResumableShuffleSampler": "sampler",
    "SLIDE_BACKENDS": "wsi",
    "SyntheticSlide": "synthetic",
    "TiffSlideReader": "wsi",
    "budget_count": "budget",
    "budget_record": "budget",
    "check_volume": "volumes",
    "convert_to_nifti": "volumes",
    "face_class_names": "faces",
    "face_palette": "faces",
    "geojson_to_instances": "instance_export",
    "faces_datalist": "faces",
    "glas_datalist": "glas",
    "heldout_cache": "holdout",
    "holdout_split": "holdout",
    "image_folder_datalist": "folder",
    "image_size": "instances",
    "instances_to_geojson": "instance_export",
    "make_sample": "synthetic",
    "monuseg_datalist": "monuseg",
    "natural_sort_key": "folder",
    "nifti_folder_datalist": "volumes",
    "open_slide": "wsi",
    "preprocessed_datalist": "preprocessed",
    "rasterize_monuseg_xml": "monuseg",
    "read_class_map": "faces",
    "read_glas_grades": "glas",
    "read_instance_map": "instances",
    "read_monuseg_polygons": "monuseg",
    "select_labelled": "budget",
    "select_level": "wsi",
    "slide_reader_class": "wsi",
    "synthesize_tile": "synthetic",
    "synthesize_volume": "synthetic",
    "tiled_nucleus_instances": "instance_export",
    "tissue_mask": "wsi",
    "volume_datalist": "volumes",
    "write_demo_data": "synthetic",
    "write_geojson": "instance_export",
    "write_glas": "synthetic",
    "write_label_pyramid": "wsi",
    "write_label_tiff": "instance_export",
    "write_monuseg": "synthetic",
    "write_nucleus_instances": "instance_export",
    "write_slide_nuclei": "instance_export",
    "write_synthetic_slide": "synthetic",
    "write_volumes": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
