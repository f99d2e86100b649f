"""What several tests share: the repository layout and small generated data sets (a module, not conftest, so
that tests import it explicitly)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # shipped in the repository: no test skips for a missing file
SCHEMA = REPO / "configs" / "metadata_schema.json"
BUNDLES = REPO / "bundles"


def error_chain(exc: BaseException) -> str:
    """MONAI wraps errors raised while parsing a bundle config; users read the whole chain, so tests do too."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def write_face_parts(root: Path, n: int = 3, size: int = 64, seed: int = 0) -> Path:
    """Tiny face-part set in the DDPM-seg layout: ``<n>.png`` with ``<n>.npy`` class maps (255 = ignore)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
        classes = np.zeros((size, size), np.uint8)
        classes[(yy - cy) ** 2 / 0.12 + (xx - cx) ** 2 / 0.08 < 1] = 1  # face
        classes[yy < cy - 0.3] = 28  # hair
        for ex in (cx - 0.12, cx + 0.12):
            classes[(yy - cy + 0.08) ** 2 + (xx - ex) ** 2 < 0.003] = 7  # eyes
        classes[(np.abs(yy - cy - 0.18) < 0.03) & (np.abs(xx - cx) < 0.1)] = 16  # mouth
        classes[:1] = 255  # an ignored row, as DDPM-seg marks unlabelled pixels
        colours = rng.integers(0, 255, (256, 3))
        image = colours[classes].astype(np.float64) + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
        np.save(root / f"{i}.npy", classes)
    return root
