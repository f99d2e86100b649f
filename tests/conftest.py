"""Shared pytest fixtures; plain helpers live in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """The embedded synthetic GlaS and MoNuSeg sets, written once per test session."""
    from monai_mdm.data.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo_data"), seed=0)
