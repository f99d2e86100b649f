"""Multi-process (DDP) training with the bundles' multi_gpu_train.json: 2 CPU processes, gloo backend, torchrun."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import run

from helpers import BUNDLES, REPO

PRETRAIN = BUNDLES / "mdm_pretrain" / "configs"
GLAS = BUNDLES / "mdm_glas_fewshot" / "configs"
VOLUME = BUNDLES / "mdm_volume_fewshot" / "configs"
WORLD = 2


def _torchrun(configs: Path, log_dir: Path, **overrides) -> dict[int, str]:
    """Run ``train.json`` merged with ``multi_gpu_train.json`` on 2 CPU processes; return each rank's log."""
    returncode, stderr, logs = _torchrun_result(configs, log_dir, **overrides)
    tails = "\n".join(f"--- rank {r}:\n{text[-3000:]}" for r, text in logs.items())
    assert returncode == 0, f"torchrun failed ({returncode}):\n{stderr[-2000:]}\n{tails}"
    return logs


def _torchrun_result(configs: Path, log_dir: Path, **overrides) -> tuple[int, str, dict[int, str]]:
    config_file = str([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={WORLD}",
        "--log-dir", str(log_dir), "--redirects", "3",
        "-m", "monai.bundle", "run", "--config_file", config_file, "--logging_file", str(configs / "logging.conf"),
        "--backend", "gloo",
    ]  # fmt: skip
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs = {}
    for rank in range(WORLD):
        files = sorted(log_dir.glob(f"*/attempt_0/{rank}/std*.log"))
        logs[rank] = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return result.returncode, result.stderr, logs


@pytest.fixture(scope="module")
def ddp_pretrain(demo_data, tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """2 iterations on one process, then continued to 4 on two: resume works across the switch."""
    out = tmp_path_factory.mktemp("ddp_pretrain")
    tiny = dict(image_size=32, batch_size=4, num_workers=0, save_interval=2, grid_interval=2)
    run(config_file=str(PRETRAIN / "train.json"), dataset_dir=str(demo_data["glas"]), output_dir=str(out),
        max_iterations=2, progress_bar=False, **tiny)  # fmt: skip
    logs = _torchrun(PRETRAIN, out / "torchrun", dataset_dir=demo_data["glas"], output_dir=out, max_iterations=4,
                     **tiny)  # fmt: skip
    return out, logs


def test_ddp_pretraining_resumes_on_every_rank_and_rank0_alone_writes(ddp_pretrain):
    from monai_mdm.networks import MDMUNet

    out, logs = ddp_pretrain
    for rank, log in logs.items():
        assert f"rank {rank} of {WORLD} (local rank {rank}) on cpu, backend gloo" in log
        assert re.search(r"resumed from '.*checkpoint_2\.pt' at iteration 2", log), f"rank {rank} did not resume"
        assert "Engine run finished" in log
    models = out / "models"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_2.pt", "checkpoint_4.pt", "model.pt", "model_ema.pt"]
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["recon_0000002.png", "recon_0000004.png"]
    ckpt = torch.load(models / "checkpoint_4.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 4
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {4}  # continued, not restarted
    state = torch.load(models / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)  # the plain network is saved, not the DDP wrapper
    MDMUNet.from_preset("tiny").load_state_dict(state)


def test_ddp_head_training_shards_the_cache_and_stops_together(ddp_pretrain, demo_data, tmp_path):
    from monai_mdm.inferers import MDMSegmenter, load_segmentation_model

    pretrained = ddp_pretrain[0] / "models" / "model_ema.pt"
    out = tmp_path / "glas"
    # 20% of 12 images = 2 labelled, x 3 crops = 6 crops: 3 per rank; global batch 2 = 1 per rank
    logs = _torchrun(GLAS, tmp_path / "torchrun", dataset_dir=demo_data["glas"], output_dir=out,
                     pretrained_weights=pretrained, label_budget=0.2, crop_size=32, crops_per_image=3,
                     batch_size=2, max_steps=4, epoch_length=2, warmup_epochs=0, patience=1)  # fmt: skip
    losses, restored = {}, {}
    for rank, log in logs.items():
        assert f"cached 3 of 6 crops (shard {rank} of {WORLD})" in log
        losses[rank] = re.findall(r"Epoch\[\d+\] Metrics -- epoch_loss: ([\d.]+) heldout_dice: ([\d.]+) "
                                  r"heldout_loss: ([\d.]+)", log)  # fmt: skip
        restored[rank] = re.findall(r"restored the head of epoch (\d+)", log)
        assert 1 <= len(losses[rank]) <= 2 and len(restored[rank]) == 1, f"rank {rank}: {losses[rank]}"
    # training and held-out losses are summed over ranks, so the stopping decision and the kept epoch agree
    assert losses[0] == losses[1] and restored[0] == restored[1]
    assert [("saved model" in logs[r]) for r in range(WORLD)] == [True, False]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.pt"]
    assert json.loads((out / "label_budget.json").read_text())["count"] == 2
    assert isinstance(load_segmentation_model(out / "models" / "model.pt"), MDMSegmenter)


def test_unreachable_tracking_server_stops_every_rank_before_training(demo_data, tmp_path):
    """Only rank 0 tracks; the others must stop with its error, not wait for it in the first all-reduce."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed
    out = tmp_path / "run"
    returncode, _, logs = _torchrun_result(
        PRETRAIN, tmp_path / "torchrun", dataset_dir=demo_data["glas"], output_dir=out, max_iterations=2,
        image_size=32, batch_size=4, num_workers=0, tracking="mlflow", tracking_uri=uri,
    )  # fmt: skip
    assert returncode != 0
    for rank in range(WORLD):
        assert uri in logs[rank], f"rank {rank} does not say why it stopped:\n{logs[rank][-2000:]}"
    assert "the tracking process (rank 0) stopped the run" in logs[1]
    assert not (out / "models").exists() or not any((out / "models").iterdir())


def test_ddp_volume_head_training_shards_the_3d_cache_and_rank0_saves(tmp_path):
    from monai_mdm.data.synthetic import write_volumes
    from monai_mdm.inferers import MDMSegmenter, load_segmentation_model
    from monai_mdm.networks import MDMUNet

    data = write_volumes(tmp_path / "volumes", n_train=2, n_test=0, size=(16, 16, 12), seed=0)  # 16^3 at 1.5 mm
    weights = tmp_path / "unet3d.pt"
    torch.save(MDMUNet.from_preset("tiny3d").state_dict(), weights)  # untrained: the distribution is tested
    out = tmp_path / "volume"
    # 2 labelled volumes x 2 cubes = 4 cubes: 2 per rank; global batch 2 = 1 per rank
    logs = _torchrun(VOLUME, tmp_path / "torchrun", dataset_dir=data, output_dir=out, pretrained_weights=weights,
                     label_budget=2, crop_size=16, crops_per_image=2, batch_size=2, max_steps=4,
                     epoch_length=2, warmup_epochs=0)  # fmt: skip
    losses = {}
    for rank, log in logs.items():
        assert f"cached 2 of 4 crops (shard {rank} of {WORLD})" in log
        losses[rank] = re.findall(r"Epoch\[\d+\] Metrics -- epoch_loss: ([\d.]+)", log)
        assert len(losses[rank]) == 2, f"rank {rank} did not train 2 epochs"
    assert losses[0] == losses[1]
    assert [("saved model" in logs[r]) for r in range(WORLD)] == [True, False]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.pt"]
    model = load_segmentation_model(out / "models" / "model.pt")
    assert isinstance(model, MDMSegmenter) and model.extractor.spatial_dims == 3


# ---------------------------------------------------------------- the pieces, in one process


def test_global_batch_is_split_evenly_or_refused():
    from monai_mdm.distributed import per_rank_batch_size

    assert per_rank_batch_size(8, world_size=2) == 4
    assert per_rank_batch_size(8) == 8  # not distributed: one process takes the whole batch
    for bad in (1, 6):
        with pytest.raises(ValueError, match=f"batch_size {bad} .* multiple of the 4 processes"):
            per_rank_batch_size(bad, world_size=4)


def test_multi_gpu_config_without_torchrun_says_how_to_launch(monkeypatch):
    from monai_mdm.distributed import init_distributed

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK.*torchrun --standalone"):
        init_distributed("gloo")


def test_sharded_caches_together_are_the_unsharded_cache():
    from monai_mdm.data import FeatureCache
    from monai_mdm.networks import MDMFeatureExtractor, MDMUNet

    torch.manual_seed(0)
    extractor = MDMFeatureExtractor(MDMUNet.from_preset("tiny"), blocks=(6, 8))
    data = [(torch.rand(3, 48, 40) * 2 - 1, torch.randint(0, 2, (1, 48, 40))) for _ in range(3)]
    kw = dict(crop_size=32, crops_per_image=1, fp16=False, seed=3)
    full = FeatureCache(extractor, data, **kw)
    shards = [FeatureCache(extractor, data, num_shards=2, shard=s, **kw) for s in range(2)]
    # 3 crops over 2 shards: 0 and 2 | 1 and 0 again, to even the shards as DistributedSampler's padding does
    order = ([0, 2], [0, 1])
    assert [s.crops for s in shards] == [[full.crops[p] for p in positions] for positions in order]
    for shard, positions in zip(shards, order):
        for i, p in enumerate(positions):
            assert torch.equal(shard.labels[i], full.labels[p])
            for a, b in zip(shard.blocks[i], full.blocks[p]):
                torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="shard must lie in"):
        FeatureCache(extractor, data, num_shards=2, shard=2, **kw)


def test_only_rank0_writes_checkpoints_models_and_grids(tmp_path, monkeypatch):
    """The non-zero ranks of a DDP run train like rank 0 but write nothing."""
    import ignite.distributed as idist
    from ignite.engine import Engine

    from monai_mdm.handlers import ReconstructionGridSaver, SaveModel, TrainingCheckpoint

    monkeypatch.setattr(idist, "get_rank", lambda: 1)  # what every rank but the first answers
    net = torch.nn.Linear(2, 2)
    handlers = [
        TrainingCheckpoint(tmp_path / "models", {"network": net}, save_interval=1, final_models={"network": "m.pt"}),
        ReconstructionGridSaver(tmp_path / "grids", interval=1),
        SaveModel(net, tmp_path / "model.pt"),
    ]
    engine = Engine(lambda e, b: {k: torch.zeros(1, 3, 8, 8) for k in ("image", "pred", "label")})
    for handler in handlers:
        handler.attach(engine)
    engine.run([0, 1], max_epochs=1)
    assert engine.state.iteration == 2 and not list(tmp_path.rglob("*"))


def test_ddp_speedup_benchmark_pieces():
    """benchmarks/ddp_speedup.py: one process's timed steps and the table (spawning N processes is what the
    torchrun tests above already cover; no timing assertions)."""
    import queue

    spec = importlib.util.spec_from_file_location("ddp_speedup", REPO / "benchmarks" / "ddp_speedup.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(bench)
    args = bench.build_parser().parse_args(["--image-size", "32", "--global-batch", "2", "--steps", "2", "--warmup", "0"])
    assert [(s.processes, s.threads) for s in bench.settings_for(args)] == [(1, 1), (2, 1), (1, 2), (2, 1)]
    results = queue.Queue()
    bench._worker(0, 1, 0, args, 1, results)
    batch, times = results.get_nowait()
    assert batch == 2 and len(times) == 2 and all(t > 0 for t in times)
    one = bench.Result(bench.Setting("1 thread/proc", 1, 1), 2, [100.0, 300.0])
    two = bench.Result(bench.Setting("1 thread/proc", 2, 1), 1, [50.0, 150.0])
    lines = bench.format_table([one, two]).splitlines()
    assert lines[0].split() == list(bench.COLUMNS)
    # 2 images per 200 ms median -> 10 images/s; twice as fast with 2 processes
    assert lines[2].split()[-4:] == ["200.0", "100.0", "10.0", "1.00"]
    assert lines[3].split()[-4:] == ["100.0", "50.0", "20.0", "2.00"]
    with pytest.raises(ValueError, match="batch_size 3 is the global batch"):
        bench.main(["--global-batch", "3"])


def test_ranks_that_see_different_checkpoints_refuse_to_resume(tmp_path, monkeypatch):
    """Multi-node runs whose nodes do not share output_dir would otherwise train from different weights."""
    from ignite.engine import Engine

    from monai_mdm.handlers import TrainingCheckpoint

    module = importlib.import_module("monai_mdm.handlers.checkpoint")
    monkeypatch.setattr(module, "all_gather_objects", lambda name: [name, None])
    saver = TrainingCheckpoint(tmp_path, {"network": torch.nn.Linear(2, 2)})
    saver.save(Engine(lambda e, b: None))
    with pytest.raises(RuntimeError, match=r"different checkpoints .*\['checkpoint_0.pt', None\].*every node"):
        saver.load_latest(Engine(lambda e, b: None))


@pytest.mark.parametrize(
    "bundle",
    ["mdm_pretrain", "mdm_glas_fewshot", "mdm_monuseg_fewshot", "mdm_face_parts_fewshot", "mdm_volume_fewshot"],
)
def test_multi_gpu_config_fits_its_train_config(bundle):
    """Every id the overlay overrides or refers to exists in train.json (two bundles run only in this file)."""
    from monai.bundle import ConfigParser

    configs = BUNDLES / bundle / "configs"
    overlay = json.loads((configs / "multi_gpu_train.json").read_text())
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json")])
    missing = [key for key in overlay if "#" in key and parser.get(key.rsplit("#", 1)[0]) is None]
    text = json.dumps(overlay)
    missing += [ref for ref in re.findall(r"@([\w#]+)", text) if ref not in overlay and parser.get(ref) is None]
    assert not missing, f"{bundle}: multi_gpu_train.json refers to {missing}, which train.json lacks"
    parser.read_config([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    assert parser.get("train#trainer#network") in ("@ddp_network", "@ddp_head")
