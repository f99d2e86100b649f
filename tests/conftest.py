"""Shared test fixtures: the repository layout and small generated data sets."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
SCHEMA = REPO / "configs" / "metadata_schema.json"
BUNDLES = REPO / "bundles"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """The embedded synthetic GlaS and MoNuSeg sets, written once per test session."""
    from monai_mdm.data.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo_data"), seed=0)


def error_chain(exc: BaseException) -> str:
    """MONAI wraps errors raised while parsing a bundle config; users read the whole chain, so tests do too."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)
