"""Smoke test of benchmarks/wsi_inference.py: it runs on a small slide and prints its figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "wsi_inference.py"


def test_wsi_benchmark_smoke(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("wsi_inference", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    argv = ["--size", "300", "300", "--window", "64", "--workdir", str(tmp_path)]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    figures = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in lines if ":" in line}
    assert "300 x 300 px, 3 levels" in figures["slide"]
    assert float(figures["peak_MiB"].split()[0]) > 0 and "ms per window run" in figures["time"]
    assert (tmp_path / "out" / "slide_seg.tif").is_file()
