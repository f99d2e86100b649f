"""Every pretraining objective through the pretraining bundle (2 iterations), its checkpoint driving a few-shot
head whose features are read the way that objective defines."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import run

from helpers import BUNDLES, error_chain
from monai_mdm.transforms import GaussianNoise, PatchMasking

PRETRAIN = str(BUNDLES / "mdm_pretrain" / "configs" / "train.json")
GLAS = BUNDLES / "mdm_glas_fewshot" / "configs"
TINY = dict(image_size=32, batch_size=2, num_workers=0, progress_bar=False, save_interval=2, grid_interval=0)
HEAD = dict(crop_size=32, crops_per_image=1, max_steps=2, epoch_length=2, warmup_epochs=0)
# the feature corruption and t each objective's checkpoint gives the few-shot bundle (its --timestep is 50)
FEATURES = {"mdm": (PatchMasking, 50), "mae": (type(None), 0), "umd": (type(None), 0),
            "diffmae": (type(None), 0), "ddpm": (GaussianNoise, 50)}  # fmt: skip


@pytest.mark.parametrize("name", list(FEATURES))
def test_objective_pretrains_and_drives_a_few_shot_head(name, demo_data, tmp_path):
    from monai_mdm.inferers import load_segmentation_model

    out = tmp_path / "pretrain"
    run(config_file=PRETRAIN, dataset_dir=str(demo_data["glas"]), output_dir=str(out), max_iterations=2,
        objective=name, **TINY)  # fmt: skip
    record = torch.load(out / "models" / "model_ema.pt", weights_only=True)["pretraining"]["objective"]
    assert record["name"] == name and record["num_timesteps"] == 1000
    ckpt = torch.load(out / "models" / "checkpoint_2.pt", weights_only=False)
    assert ckpt["pretraining"]["objective"] == record

    head = tmp_path / "head"
    run(config_file=str(GLAS / "train.json"), dataset_dir=str(demo_data["glas"]), output_dir=str(head),
        pretrained_weights=str(out / "models" / "model_ema.pt"), label_budget=["train_1"], **HEAD)  # fmt: skip
    model = load_segmentation_model(head / "models" / "model.pt")
    kind, timestep = FEATURES[name]
    assert isinstance(model.extractor.corruption, kind) and model.extractor.timestep == timestep
    assert model.pretraining["objective"] == record


def test_resuming_a_checkpoint_of_another_objective_is_refused(demo_data, tmp_path):
    out = tmp_path / "run"
    run(config_file=PRETRAIN, dataset_dir=str(demo_data["glas"]), output_dir=str(out), max_iterations=2, **TINY)
    before = {p.name: p.read_bytes() for p in (out / "models").iterdir()}
    with pytest.raises(Exception) as info:
        run(config_file=PRETRAIN, dataset_dir=str(demo_data["glas"]), output_dir=str(out), max_iterations=4,
            objective="umd", **TINY)  # fmt: skip
    assert "--objective umd: the checkpoint" in error_chain(info.value)
    assert "pretrained with objective 'mdm'" in error_chain(info.value)
    assert {p.name: p.read_bytes() for p in (out / "models").iterdir()} == before
