"""The pretraining bundle end to end on tiny data: metadata, training, outputs, resume, tracking, bad input."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run, verify_metadata
from PIL import Image

from helpers import BUNDLES, REPO, SCHEMA, error_chain
from monai_mdm.networks import MDMUNet

TRAIN = str(BUNDLES / "mdm_pretrain" / "configs" / "train.json")
# the smallest settings that still exercise every handler
TINY = dict(image_size=32, batch_size=2, num_workers=0, progress_bar=False, save_interval=2, grid_interval=2)


def _train(dataset_dir, output_dir, **overrides):
    settings = {**TINY, **overrides}
    return run(config_file=TRAIN, dataset_dir=str(dataset_dir), output_dir=str(output_dir), **settings)


def _write_images(folder: Path, n: int = 3, size=(40, 48), mode="RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 255, (*size, channels), dtype=np.uint8).squeeze()
        Image.fromarray(arr, mode=mode).save(folder / f"img_{i}.png")
    return folder


@pytest.mark.parametrize("bundle", sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir()))
def test_metadata_verifies_against_local_schema(bundle):
    verify_metadata(meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_schema_rejects_metadata_without_mandatory_keys(tmp_path):
    meta = json.loads((BUNDLES / "mdm_pretrain" / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


def test_train_writes_models_checkpoints_and_grids(demo_data, tmp_path):
    out = tmp_path / "run"
    _train(demo_data["glas"], out, max_iterations=4)
    models = out / "models"
    assert sorted(p.name for p in models.glob("checkpoint_*.pt")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    raw_file = torch.load(models / "model.pt", weights_only=True)
    ema_file = torch.load(models / "model_ema.pt", weights_only=True)
    raw, ema = raw_file["model"], ema_file["model"]
    assert raw.keys() == ema.keys() and "output_blocks.0.0.in_layers.0.weight" in raw
    assert raw_file["network_config"] == MDMUNet.from_preset("tiny").to_guided_diffusion_config()
    # both files say what they hold: iteration, EMA settings, updates and the initialisation's weight left
    init_weight = (1 / 10) * (2 / 11) * (3 / 12) * (4 / 13)  # warm-up decays (1 + n) / (10 + n), n = 0..3
    ema_record = {"decay": 0.9999, "warmup": True, "updates": 4, "init_weight": pytest.approx(init_weight)}
    # and the objective that trained them (the default, MDM), from which few-shot features are read
    objective = {"name": "mdm", "num_timesteps": 1000, "loss": "ssim", "patch_size": 8}
    assert raw_file["pretraining"] == {"iteration": 4, "weights": "raw", "ema": ema_record, "objective": objective}
    assert ema_file["pretraining"] == {"iteration": 4, "weights": "ema", "ema": ema_record, "objective": objective}
    ckpt = torch.load(models / "checkpoint_4.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 4
    assert set(ckpt) >= {"network", "ema", "ema_state", "optimizer", "trainer", "pretraining"}
    assert ckpt["pretraining"] == {"iteration": 4, "ema": ema_record, "objective": objective}
    assert all(torch.equal(ckpt["ema"][k], ema[k]) for k in ema)  # saved after the iteration's EMA update
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    grids = sorted((out / "grids").glob("recon_*.png"))
    assert [g.name for g in grids] == ["recon_0000002.png", "recon_0000004.png"]
    grid = np.asarray(Image.open(grids[-1]))
    # two samples of 32 px: rows of (masked | reconstruction | target) with 2 px gaps
    assert grid.shape == (32 * 2 + 2, 32 * 3 + 4, 3)


def test_resume_continues_from_latest_checkpoint(demo_data, tmp_path):
    out = tmp_path / "run"
    _train(demo_data["glas"], out, max_iterations=2, save_interval=2)
    first = torch.load(out / "models" / "checkpoint_2.pt", weights_only=False)
    _train(demo_data["glas"], out, max_iterations=4, save_interval=2)
    second = torch.load(out / "models" / "checkpoint_4.pt", weights_only=False)
    assert second["trainer"]["iteration"] == 4
    # the optimizer state continued (AdamW step count 4, not 2)
    steps = {int(s["step"]) for s in second["optimizer"]["state"].values()}
    assert steps == {4}
    assert first["trainer"]["iteration"] == 2
    # the EMA's warm-up continued too: 2 updates, then 2 more, not a restart at update 0
    assert first["ema_state"]["updates"] == 2 and second["ema_state"]["updates"] == 4
    init_weight = (1 / 10) * (2 / 11) * (3 / 12) * (4 / 13)
    assert second["ema_state"]["init_weight"] == pytest.approx(init_weight)
    final = torch.load(out / "models" / "model_ema.pt", weights_only=True)["pretraining"]
    assert final["iteration"] == 4 and final["ema"]["updates"] == 4


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(demo_data, tmp_path):
    """Masks, timesteps, crops, flips and shuffling continue from the checkpoint's random states."""
    common = dict(save_interval=6, epoch_length=3, grid_interval=0)
    _train(demo_data["glas"], tmp_path / "whole", max_iterations=12, **common)
    _train(demo_data["glas"], tmp_path / "split", max_iterations=6, **common)
    _train(demo_data["glas"], tmp_path / "split", max_iterations=12, **common)
    for name in ("model.pt", "model_ema.pt"):
        whole = torch.load(tmp_path / "whole" / "models" / name, weights_only=True)["model"]
        split = torch.load(tmp_path / "split" / "models" / name, weights_only=True)["model"]
        worst = max(float((whole[k].double() - split[k].double()).abs().max()) for k in whole)
        print(f"{name}: max |uninterrupted - resumed| = {worst}")
        assert worst == 0.0


def test_checkpoint_written_before_the_ema_state_was_saved_still_resumes(demo_data, tmp_path):
    from monai_mdm.utils import atomic_torch_save

    out = tmp_path / "run"
    _train(demo_data["glas"], out, max_iterations=2, save_interval=2, grid_interval=0)
    old = torch.load(out / "models" / "checkpoint_2.pt", weights_only=False)
    del old["ema_state"], old["pretraining"]  # as such checkpoints were written (constant decay throughout)
    atomic_torch_save(old, out / "models" / "checkpoint_2.pt")
    _train(demo_data["glas"], out, max_iterations=4, save_interval=2, grid_interval=0)
    state = torch.load(out / "models" / "checkpoint_4.pt", weights_only=False)["ema_state"]
    assert state["updates"] == 4 and state["init_weight"] == pytest.approx(0.9999**2 * (3 / 12) * (4 / 13))


def test_ema_leaves_the_initialisation_within_30_iterations(demo_data, tmp_path):
    """With the warm-up the EMA follows training from the start instead of staying ~the random init."""
    out = tmp_path / "run"
    out.mkdir()
    keep_init = "$torch.save(@network.state_dict(), @output_dir + '/init.pt')"  # before any training step
    _train(demo_data["glas"], out, max_iterations=30, save_interval=30, grid_interval=0,
           run=[keep_init, "$@train#trainer.run()"])  # fmt: skip
    init = torch.load(out / "init.pt", weights_only=True)
    raw = torch.load(out / "models" / "model.pt", weights_only=True)["model"]
    ema = torch.load(out / "models" / "model_ema.pt", weights_only=True)["model"]

    def distance(weights):
        return float(torch.sqrt(sum(((weights[k] - init[k]).double() ** 2).sum() for k in init)))

    fraction = distance(ema) / distance(raw)
    print(f"after 30 iterations ||ema - init|| / ||raw - init|| = {fraction:.3f}")
    assert distance(raw) > 0 and fraction >= 0.5


def test_ema_without_warmup_is_recorded_as_such(demo_data, tmp_path):
    _train(demo_data["glas"], tmp_path, max_iterations=2, save_interval=2, grid_interval=0, ema_warmup=False)
    record = torch.load(tmp_path / "models" / "model_ema.pt", weights_only=True)["pretraining"]
    assert record["ema"] == {"decay": 0.9999, "warmup": False, "updates": 2, "init_weight": pytest.approx(0.9999**2)}


def test_killed_run_resumes_where_it_stopped(demo_data, tmp_path):
    """SIGKILL a real training process after a checkpoint, start it again, and it picks up from there."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", TRAIN,
        "--dataset_dir", str(demo_data["glas"]), "--output_dir", str(out),
        "--max_iterations", "400", "--save_interval", "2", "--grid_interval", "0",
        "--image_size", "32", "--batch_size", "2", "--num_workers", "0", "--progress_bar", "False",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "models").glob("checkpoint_*.pt")):
            assert proc.poll() is None, "training ended before writing a checkpoint"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = sorted(int(p.stem.split("_")[1]) for p in (out / "models").glob("checkpoint_*.pt"))
    assert saved, "no checkpoint written before the kill"
    last = saved[-1]
    for p in (out / "models").glob("checkpoint_*.pt"):
        torch.load(p, weights_only=False)  # every visible checkpoint is complete
    result = subprocess.run(
        [*cmd[:-16], "--dataset_dir", str(demo_data["glas"]), "--output_dir", str(out),
         "--max_iterations", str(last + 2), "--save_interval", "2", "--grid_interval", "0",
         "--image_size", "32", "--batch_size", "2", "--num_workers", "0", "--progress_bar", "False"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at iteration {last}" in result.stderr + result.stdout
    final = torch.load(out / "models" / f"checkpoint_{last + 2}.pt", weights_only=False)
    assert final["trainer"]["iteration"] == last + 2


def test_mlflow_tracking_records_loss_config_and_grids(demo_data, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    _train(demo_data["glas"], out, max_iterations=4, tracking="mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("mdm_pretrain")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "train_loss")
    assert len(history) == 4 and all(np.isfinite(m.value) for m in history)
    params = mlrun.data.params
    assert params["preset"] == "tiny" and params["image_size"] == "32" and params["loss"] == "ssim"
    grids = [a.path for a in client.list_artifacts(mlrun.info.run_id, "reconstructions")]
    assert grids == ["reconstructions/recon_0000002.png", "reconstructions/recon_0000004.png"]
    (config,) = client.list_artifacts(mlrun.info.run_id, "config")
    local = client.download_artifacts(mlrun.info.run_id, config.path, str(tmp_path))
    assert json.loads(Path(local).read_text())["preset"] == "tiny"


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_other_losses_train(demo_data, tmp_path, loss):
    _train(demo_data["glas"], tmp_path / loss, max_iterations=2, loss=loss, grid_interval=0)
    assert (tmp_path / loss / "models" / "model.pt").is_file()


def test_gradient_accumulation_steps_optimizer_less_often(demo_data, tmp_path):
    out = tmp_path / "acc"
    _train(demo_data["glas"], out, max_iterations=4, accumulation_steps=2, grid_interval=0)
    ckpt = torch.load(out / "models" / "checkpoint_4.pt", weights_only=False)
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2}


def test_grayscale_and_rgba_images_are_converted_with_one_warning(tmp_path):
    folder = tmp_path / "mixed"
    _write_images(folder / "gray", n=2, mode="L")
    _write_images(folder / "rgba", n=2, mode="RGBA")
    from monai_mdm.transforms import EnsureRGB

    EnsureRGB._warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(folder, tmp_path / "out", max_iterations=2, grid_interval=0)
    rgb_warnings = [w for w in caught if "RGB" in str(w.message)]
    assert len(rgb_warnings) == 1 and "img_" in str(rgb_warnings[0].message)
    assert (tmp_path / "out" / "models" / "model.pt").is_file()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no images"),
        (lambda d: _write_images(d / "small", size=(20, 40)), r"smaller than the crop 32 x 32"),
    ],
)
def test_bad_dataset_dir_gets_clear_error(tmp_path, make, match):
    with pytest.raises(Exception) as info:
        _train(make(tmp_path), tmp_path / "out", max_iterations=2)
    text = error_chain(info.value)
    assert re.search(match, text), text
    assert "dataset_dir" in text or "img_" in text


def test_truncated_image_is_named(tmp_path):
    folder = _write_images(tmp_path / "data", n=2)
    data = (folder / "img_1.png").read_bytes()
    (folder / "img_1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as info:
        _train(folder, tmp_path / "out", max_iterations=2)
    assert re.search(r"img_1\.png.*truncated", error_chain(info.value))


def test_checkpoint_of_another_architecture_is_refused(demo_data, tmp_path):
    out = tmp_path / "run"
    _train(demo_data["glas"], out, max_iterations=2, grid_interval=0)
    good = (out / "models" / "checkpoint_2.pt").read_bytes()
    with pytest.raises(Exception) as info:
        _train(demo_data["glas"], out, max_iterations=4, grid_interval=0, preset="tiny3d", spatial_dims=2, in_channels=3)
    assert re.search(r"checkpoint_2\.pt.*(preset|settings)", error_chain(info.value), re.S)
    assert (out / "models" / "checkpoint_2.pt").read_bytes() == good  # the failed run left it untouched


def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from monai_mdm.utils import atomic_torch_save

    target = tmp_path / "checkpoint_2.pt"
    atomic_torch_save({"a": torch.ones(3)}, target)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_2.pt"]


def test_gradient_checkpointing_trains_the_same_weights(demo_data, tmp_path):
    for name, on in (("plain", False), ("checkpointed", True)):
        _train(demo_data["glas"], tmp_path / name, max_iterations=2, grid_interval=0, gradient_checkpointing=on)
    plain = torch.load(tmp_path / "plain" / "models" / "model.pt", weights_only=False)
    checkpointed = torch.load(tmp_path / "checkpointed" / "models" / "model.pt", weights_only=False)
    assert checkpointed["network_config"]["use_checkpoint"] is True  # the model file says how it was trained
    assert plain["network_config"]["use_checkpoint"] is False
    for key, value in plain["model"].items():
        torch.testing.assert_close(checkpointed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
