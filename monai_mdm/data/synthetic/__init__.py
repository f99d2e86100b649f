"""Deterministic synthetic data for the demo, the tests and the benchmarks, in the official layouts: nothing is
downloaded, so everything runs offline.

- ``tiles`` (with ``histology``, ``glas``, ``monuseg``): H&E-like tiles in the GlaS and MoNuSeg layouts. They are
  rendered with a Beer-Lambert stain model: two concentration maps (hematoxylin, eosin) turned into optical
  density with stain vectors and then into RGB, then blurred and given sensor noise. Images vary between cases as
  in the real sets (``docs/synthetic_data.md``): each GlaS slide (patient) has its own stain and gland size, some
  slides only give test images, the grade drives the gland morphology, and blur, tissue folds, tissue edges and
  fat vary per image; each MoNuSeg tile has its own stain and an organ (named by the TCGA site code of its file
  name) setting its nuclei. Labelled structures are built as polygons first and the picture is painted from
  them, so the instance maps are exact: MoNuSeg nuclei are rasterised with ``skimage.draw.polygon`` from the very
  vertices written to the XML (snapped to a 1/4-pixel grid, so the text round-trips exactly).
- ``slides``: a pyramidal whole-slide TIFF of embedded tiles on glass, written tile by tile.
- ``volumes``: CT-like NIfTI volumes in the Decathlon layout.

The writers take the folder names and constants of the readers (``data/monuseg.py``, ``data/volumes.py``) and
write every file through ``utils.atomic_write``.

Examples::

    python -m monai_mdm.data.synthetic --out demo_data --seed 0
    python -m monai_mdm.data.volumes synthetic --out demo_data/Volumes --seed 0

    from monai_mdm.data import write_demo_data
    paths = write_demo_data("demo_data")   # {"glas": .../GlaS, "monuseg": .../MoNuSeg}
"""

from .glas import GLAS_GRADE_HEADER, write_glas
from .histology import SyntheticTile
from .monuseg import (
    MONUSEG_ORGANS,
    MONUSEG_TEST_DIR,
    MONUSEG_TRAIN_DIR,
    monuseg_organ,
    write_monuseg,
)
from .slides import SyntheticSlide, write_synthetic_slide
from .tiles import (
    make_sample,
    synthesize_tile,
    write_demo_data,
    write_examples,
)
from .volumes import synthesize_volume, write_volumes

__all__ = [
    "GLAS_GRADE_HEADER",
    "MONUSEG_ORGANS",
    "MONUSEG_TEST_DIR",
    "MONUSEG_TRAIN_DIR",
    "SyntheticSlide",
    "SyntheticTile",
    "make_sample",
    "monuseg_organ",
    "synthesize_tile",
    "synthesize_volume",
    "write_demo_data",
    "write_examples",
    "write_glas",
    "write_monuseg",
    "write_synthetic_slide",
    "write_volumes",
]
