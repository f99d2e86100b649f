"""Smoke tests of the benchmark scripts and the GPU suite: they run and print well-formed tables (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_throughput.py"


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


def test_pretrain_throughput_measures_the_3d_preset(capsys):
    bench = _load_script()
    argv = ["--preset", "tiny3d", "--image-size", "16", "--batch", "2", "--steps", "1", "--warmup", "0"]
    assert bench.main(argv + ["--device", "cpu", "--skip-masking"]) == 0
    header, rows = _table(capsys.readouterr().out.splitlines(), "Training step")
    assert len(rows) == 1 and rows[0][0] == "tiny3d"
    assert float(rows[0][header.index("images/s")]) > 0 and float(rows[0][header.index("loss")]) > 0


FEWSHOT_SCRIPT = SCRIPT.parent / "fewshot_memory.py"


def test_fewshot_memory_smoke(capsys):
    spec = importlib.util.spec_from_file_location("fewshot_memory", FEWSHOT_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)  # importing must not run the benchmark
    assert capsys.readouterr().out == ""

    argv = ["--preset", "tiny", "--blocks", "3", "4", "5", "6", "7", "--crop-size", "32", "--image-size", "64", "96"]
    argv += ["--num-images", "2", "--steps", "1", "--warmup", "0", "--epochs", "3", "--device", "cpu", "--threads", "1"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("settings : preset=tiny") and "channels=256" in line for line in lines)
    assert any(line.startswith("totals   : E=3 epochs of N=2") for line in lines)

    start = lines.index("Few-shot head training: memory and time")
    assert lines[start + 1].split() == list(bench.TABLE_COLUMNS)
    assert set(lines[start + 2].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[start + 3 :]:
        if not line.strip():
            break
        name, value, unit, kind, meaning = line.split(maxsplit=4)
        rows[name] = (float(value), unit, kind, meaning)
    assert list(rows) == list(bench.FIGURES)  # CPU: no gpu_* rows
    for name, (value, unit, kind, _) in rows.items():
        assert value > 0, name
        assert kind in ("measured", "computed"), name
    assert rows["steps_per_epoch"][0] == 2
    # 2 images x 1 crop; the cache holds what bytes_per_crop plans
    assert rows["cache_nbytes"][0] == rows["cache_planned"][0]
    # DDPM-seg: 2 x 32 x 32 x 256 channels x 4 bytes, stated as computed
    assert rows["ddpmseg_features_ram"][1:3] == ("GiB", "computed")
    expected_gib = 2 * 32 * 32 * 256 * 4 / 2**30
    assert abs(rows["ddpmseg_features_ram"][0] - expected_gib) < 1e-3 * expected_gib
    assert rows["sliding_window_windows"][0] >= 6  # 64 x 96 image, 32 px windows, overlap 0.2


GPU_SUITE = SCRIPT.parent / "gpu_suite.sh"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_dry_run_prints_every_row(tmp_path):
    """Every step of the GPU suite on the CPU (tiny sizes, 1-2 iterations): the same scripts, flags and bundle."""
    import os
    import subprocess

    suite = _load(SCRIPT.parent / "gpu_suite.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(GPU_SUITE), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + (tmp_path / "gpu_suite.log").read_text()[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| benchmark | setting | result | peak memory (MiB) |"
    rows = {line.split(" | ")[0][2:]: line for line in table[1:]}
    assert list(rows) == suite.ROW_NAMES
    assert not [line for line in rows.values() if "FAILED" in line]
    assert "images/s" in rows["pretraining, bf16 + channels-last + torch.compile"]
    assert "Mpx/s" in rows["inference (sliding window)"]
    assert "world size 1" in rows["pretraining bundle, DDP via torchrun (1 process)"]
    assert [line for line in (tmp_path / "gpu_suite.md").read_text().splitlines() if line.startswith("| ")] == table
    assert (tmp_path / "gpu_suite.log").is_file()
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert results["pretrain_bf16_ckpt.json"]["train"][0]["gradient_checkpointing"] is True


def test_gpu_suite_stops_before_running_when_something_is_missing(tmp_path, capsys):
    import os
    import subprocess

    # no GPU here: the real run refuses at once and says why, with nothing run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(GPU_SUITE), "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert "missing: no CUDA GPU is visible to PyTorch" in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("stopped before running anything (see above).")
    assert not list(tmp_path.iterdir())

    # a module that is not there is named, with where it comes from
    suite = _load(SCRIPT.parent / "gpu_suite.py")
    suite.NEEDED = {"monai_not_installed": "the carried wheels (bash benchmarks/device_wheels.sh, then carry .whl)"}
    assert suite.check("cpu", "no-such-torchrun") == 2
    err = capsys.readouterr().err
    assert "python module 'monai_not_installed' cannot be imported" in err and "device_wheels.sh" in err
    assert "torchrun (no-such-torchrun) is not there" in err


def test_inference_throughput_smoke(capsys):
    bench = _load(SCRIPT.parent / "inference_throughput.py")
    argv = ["--preset", "tiny", "--window", "32", "--image-size", "48", "80", "--sw-batch", "2", "--reps", "2",
            "--warmup", "0", "--compare-assembled", "--threads", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "command  : python benchmarks/inference_throughput.py " + " ".join(argv)
    header, rows = _table(lines, "Per window")
    assert header == ["path", "ms/window", "min_ms", "Mpx/s", "x_floor", "x_floor_min"]
    names = [" ".join(r[: len(r) - 5]) for r in rows]
    assert names == ["segmenter", "bare decoder", "assembled head (old)"]
    assert [float(v) for v in rows[1][-2:]] == [1.0, 1.0]  # the floor against itself
    _, image_rows = _table(lines, "One image")
    figures = {r[0]: float(r[1]) for r in image_rows}
    assert set(figures) == {"time", "throughput", "peak_rss"} and all(v > 0 for v in figures.values())
    assert "6 windows of 32 px" in " ".join(image_rows[0])  # 48 x 80: 2 x 3 windows


def test_pretrain_step_profile_smoke(capsys):
    bench = _load(SCRIPT.parent / "pretrain_step_profile.py")
    assert bench.main(["--image-size", "16", "--batch", "2", "--steps", "1", "--warmup", "0", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0].strip() for line in lines[1:6]] == list(bench.PARTS)
    assert lines[-1].startswith("step (sum of the medians)")
