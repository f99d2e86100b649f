"""Smoke test of benchmarks/pretrain_throughput.py: it runs and prints well-formed tables (no timing assertions)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_throughput.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("pretrain_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


def _table(lines: list[str], title_start: str) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows of the table printed below the line starting with ``title_start``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    header = lines[start + 1].split()
    assert set(lines[start + 2].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[start + 3 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return header, rows


def test_pretrain_throughput_smoke(capsys):
    bench = _load_script()
    argv = ["--preset", "tiny", "--image-size", "32", "--batch", "2", "--steps", "1", "--warmup", "0"]
    argv += ["--device", "cpu", "--compare-reference", "--mask-batch", "4", "--mask-size", "32", "--mask-reps", "2"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("software : torch") for line in lines)
    assert any(line.startswith("memory   : peak_MiB = CPU peak RSS") for line in lines)

    header, rows = _table(lines, "Training step")
    assert header == list(bench.TRAIN_COLUMNS)
    assert len(rows) == 2  # reference (2 micro-batches of 1) and batched
    assert [r[header.index("micro")] for r in rows] == ["2", "1"]
    for row in rows:
        assert len(row) == len(header)
        for col in ("ms/step", "min_ms", "max_ms", "images/s", "peak_MiB"):
            assert float(row[header.index(col)]) > 0, (col, row)

    header, rows = _table(lines, "Reference (batch-many micro-batches of 1) vs batched")
    assert header == list(bench.COMPARE_COLUMNS)
    assert len(rows) == 1 and float(rows[0][-1]) > 0

    # method names contain spaces: read the numbers from the right
    header, rows = _table(lines, "Patch masking of a (4, 3, 32, 32) batch")
    assert header[-4:] == ["size", "ms/batch", "min_ms", "slowdown"]
    assert len(rows) == 3
    for row in rows:
        assert all(float(v) > 0 for v in row[-3:]), row
