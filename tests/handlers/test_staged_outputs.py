"""Outputs stay consistent: an evaluation that fails midway leaves the previous one whole, an unwritable output
folder is refused before training, a killed write's temporary file is removed on the next start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from monai_mdm.handlers import SegmentationReport
from monai_mdm.utils import StagedFolder, atomic_path, prepare_output_folder


def batches(n: int, fail_at: int | None = None):
    rng = np.random.default_rng(0)
    for i in range(n):
        if i == fail_at:
            raise OSError(f"image {i} cannot be read")
        truth = np.zeros((1, 1, 16, 16), np.int64)
        truth[0, 0, 4:10, 4:10] = 1
        scores = torch.as_tensor(rng.normal(size=(1, 2, 16, 16)), dtype=torch.float32)
        scores[0, 1, 4:10, 4:10] += 5
        yield {"name": [f"case_{i}"], "label_instances": torch.as_tensor(truth)}, scores


def evaluate(out, n: int, fail_at: int | None = None) -> None:
    data = batches(n, fail_at)

    def step(engine, _):
        batch, scores = next(data)
        engine.state.batch = batch
        return {"pred": scores, "image": torch.zeros(1, 3, 16, 16)}

    engine = Engine(step)
    SegmentationReport(out, dataset="glas", run="test").attach(engine)
    engine.run(range(n), max_epochs=1)


def listing(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_evaluation_leaves_the_previous_one_whole(tmp_path):
    out = tmp_path / "evaluation"
    evaluate(out, 2)
    before = listing(out)
    assert {"metrics.csv", "metrics.json", "predictions/case_0.png", "overlays/case_1.png"} <= set(before)

    with pytest.raises(OSError, match="image 2"):
        evaluate(out, 4, fail_at=2)  # two new predictions were written before the failure
    assert listing(out) == before

    evaluate(out, 3)
    names = [r["name"] for r in json.loads((out / "metrics.json").read_text())["rows"]]
    assert names == ["case_0", "case_1", "case_2"]
    assert "predictions/case_2.png" in listing(out)
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation"]  # no staging folder left behind


def test_staged_folder_replaces_the_whole_folder(tmp_path):
    final = tmp_path / "eval"
    final.mkdir()
    (final / "stale.png").write_text("old")
    staged = StagedFolder(final)
    staged.begin().joinpath("new.png").write_text("new")
    assert (final / "stale.png").exists()  # untouched until commit
    staged.commit()
    assert [p.name for p in final.iterdir()] == ["new.png"]


def test_unwritable_output_folder_is_refused_naming_the_setting(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"--output_dir: cannot write to '.*a_file/run'"):
        prepare_output_folder(blocker / "run")


def test_temporary_file_of_a_killed_write_is_removed_on_the_next_start(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "checkpoint_3.pt") as tmp:
            Path(tmp).write_bytes(b"half a checkpoint")
            killed = Path(tmp)
            raise KeyboardInterrupt  # atomic_path removes it when it can; a SIGKILL leaves it
    killed.write_bytes(b"half a checkpoint")  # what a SIGKILL leaves behind
    (tmp_path / "model.pt").write_bytes(b"kept")
    prepare_output_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_inference_outputs_appear_only_when_the_run_completes(tmp_path):
    """PublishWhenComplete: the saver writes into the staging sibling; a failed run adds and changes nothing,
    a complete one moves its predictions in beside the folder's other files."""
    from monai_mdm.handlers import PublishWhenComplete

    out = tmp_path / "eval"
    out.mkdir()
    (out / "case_0_seg.png").write_text("earlier prediction")
    (out / "notes.txt").write_text("kept")
    staging = Path(PublishWhenComplete.staging_for(out))

    def infer(n: int, fail_at: int | None = None) -> None:
        def step(engine, i):
            if i == fail_at:
                raise OSError("disk full")
            (staging / f"case_{i}_seg.png").write_text(f"new {i}")

        engine = Engine(step)
        PublishWhenComplete(out).attach(engine)
        engine.run(range(n), max_epochs=1)

    with pytest.raises(OSError):
        infer(3, fail_at=1)
    assert listing(out) == {"case_0_seg.png": b"earlier prediction", "notes.txt": b"kept"}
    infer(2)
    assert listing(out) == {"case_0_seg.png": b"new 0", "case_1_seg.png": b"new 1", "notes.txt": b"kept"}
    assert not staging.exists()
