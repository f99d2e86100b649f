"""MLflow end to end: tiny bundles record to a real ``mlflow server`` and the runs are read back with its client.

The server runs on 127.0.0.1 with a sqlite backend and proxied artifacts in a temporary folder. The pretraining
and evaluation runs get the server from ``--tracking_uri``, the few-shot training from ``MLFLOW_TRACKING_URI``:
the two ways to point a bundle at a tracking server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run
from PIL import Image

from helpers import BUNDLES, error_chain, write_face_parts

PRETRAIN = str(BUNDLES / "mdm_pretrain" / "configs" / "train.json")
GLAS = BUNDLES / "mdm_glas_fewshot" / "configs"
FACES = BUNDLES / "mdm_face_parts_fewshot" / "configs"
VOLUME = BUNDLES / "mdm_volume_fewshot" / "configs"
TINY_PRETRAIN = dict(image_size=32, batch_size=2, num_workers=0, progress_bar=False, save_interval=2, grid_interval=2)
HEAD = dict(crop_size=32, crops_per_image=2, max_steps=8, epoch_length=4, warmup_epochs=0, label_budget=0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """A real ``mlflow server`` subprocess; always terminated (with its workers) when the module ends."""
    root = tmp_path_factory.mktemp("mlflow_server")
    uri = f"http://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers: faster start
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1],
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as answer:
                    assert answer.read() == b"OK"
                break
            except OSError:
                assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
                assert time.time() < deadline, "mlflow server did not answer within 300 s"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def client(server) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(server)


@pytest.fixture(scope="module")
def pretrain_run(server, demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    run(
        config_file=PRETRAIN, dataset_dir=str(demo_data["glas"]), output_dir=str(out), max_iterations=4,
        tracking="mlflow", tracking_uri=server, **TINY_PRETRAIN,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def small_glas(demo_data, tmp_path_factory) -> Path:
    """The demo GlaS set cut to 96 x 64 px, so that sliding-window evaluation and prediction stay quick."""
    root = tmp_path_factory.mktemp("small_glas")
    for path in demo_data["glas"].iterdir():
        if path.suffix == ".bmp":
            Image.open(path).crop((64, 48, 160, 112)).save(root / path.name)
        else:
            (root / path.name).write_bytes(path.read_bytes())
    return root


@pytest.fixture(scope="module")
def fewshot_run(server, pretrain_run, small_glas, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fewshot")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server)
        run(
            config_file=str(GLAS / "train.json"), dataset_dir=str(small_glas), output_dir=str(out),
            pretrained_weights=str(pretrain_run / "models" / "model_ema.pt"), tracking="mlflow", **HEAD,
        )  # fmt: skip
    run(
        config_file=[str(GLAS / "train.json"), str(GLAS / "evaluate.json")], dataset_dir=str(small_glas), output_dir=str(out),
        window_size=HEAD["crop_size"], tracking="mlflow", tracking_uri=server,
    )  # fmt: skip
    return out


def _only_run(client, experiment: str, run_name: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert runs[0].info.status == "FINISHED"
    return runs[0]


def _artifacts(client, run_id: str, path: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id, path))


def test_pretraining_records_params_loss_grids_config_and_weights(client, pretrain_run, tmp_path):
    (mlrun,) = client.search_runs([client.get_experiment_by_name("mdm_pretrain").experiment_id])
    run_id = mlrun.info.run_id
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["preset"] == "tiny" and mlrun.data.params["max_iterations"] == "4"
    history = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4] and all(np.isfinite(m.value) for m in history)
    grids = _artifacts(client, run_id, "reconstructions")
    assert grids == ["reconstructions/recon_0000002.png", "reconstructions/recon_0000004.png"]
    local = client.download_artifacts(run_id, grids[-1], str(tmp_path))
    written = pretrain_run / "grids" / Path(local).name
    assert np.array_equal(np.asarray(Image.open(local)), np.asarray(Image.open(written)))
    (config,) = _artifacts(client, run_id, "config")
    assert json.loads(Path(client.download_artifacts(run_id, config, str(tmp_path))).read_text())["image_size"] == 32
    weights = client.download_artifacts(run_id, "models/model_ema.pt", str(tmp_path))
    saved = torch.load(pretrain_run / "models" / "model_ema.pt", weights_only=True)["model"]
    downloaded = torch.load(weights, weights_only=True)["model"]
    assert saved.keys() == downloaded.keys() and all(torch.equal(v, saved[k]) for k, v in downloaded.items())


def test_fewshot_training_records_settings_losses_and_a_model_that_predicts_masks(
    client, server, fewshot_run, small_glas, monkeypatch
):
    mlrun = _only_run(client, "mdm_glas_fewshot", "mdm_train")
    run_id = mlrun.info.run_id
    params = mlrun.data.params
    assert params["label_budget"] == "0.2" and params["num_labelled"] == "2" and params["crop_size"] == "32"
    assert [m.step for m in client.get_metric_history(run_id, "epoch_loss")] == [1, 2]
    assert len(client.get_metric_history(run_id, "train_loss")) == 2 * 4  # epochs x epoch_length
    assert "model/MLmodel" in _artifacts(client, run_id, "model")
    # what users do: load the run's model and segment images; it matches the evaluation bundle's predictions
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    name = "testB_1"
    image = np.asarray(Image.open(small_glas / f"{name}.bmp").convert("RGB"))
    (mask,) = model.predict(image[None])
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    bundle_prediction = np.asarray(Image.open(fewshot_run / "evaluation" / "predictions" / f"{name}.png")) > 0
    assert np.array_equal(mask > 0, bundle_prediction)
    assert model.predict(np.zeros((3, 20, 24, 3), np.uint8)).shape == (3, 20, 24)
    with pytest.raises(Exception, match="images|shape"):
        model.predict(image)  # one image without the batch axis is refused, not misread


def test_evaluation_records_metric_means_tables_and_overlays(client, fewshot_run, tmp_path):
    mlrun = _only_run(client, "mdm_glas_fewshot", "mdm")
    run_id = mlrun.info.run_id
    assert mlrun.data.params["window_size"] == "32" and mlrun.data.params["test_split"] == "test"
    doc = json.loads((fewshot_run / "evaluation" / "metrics.json").read_text())
    means = {f"test_{k}": v["mean"] for k, v in doc["summary"].items() if v["mean"] is not None}
    assert means and mlrun.data.metrics == pytest.approx(means)
    assert _artifacts(client, run_id, "evaluation")[:2] == ["evaluation/metrics.csv", "evaluation/metrics.json"]
    table = client.download_artifacts(run_id, "evaluation/metrics.csv", str(tmp_path))
    assert Path(table).read_text() == (fewshot_run / "evaluation" / "metrics.csv").read_text()
    overlays = _artifacts(client, run_id, "evaluation/overlays")
    written = sorted(p.name for p in (fewshot_run / "evaluation" / "overlays").iterdir())
    assert [Path(p).name for p in overlays] == written
    assert len(overlays) == len(doc["rows"])


def test_unet_baseline_is_logged_as_a_model_too(client, server, small_glas, tmp_path, monkeypatch):
    run(
        config_file=[str(GLAS / "train.json"), str(GLAS / "train_unet.json")], dataset_dir=str(small_glas),
        output_dir=str(tmp_path), tracking="mlflow", tracking_uri=server, **HEAD,
    )  # fmt: skip
    mlrun = _only_run(client, "mdm_glas_fewshot", "unet_train")
    assert mlrun.data.params["batch_size"] == "4"  # the baseline's own batch size
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    model = mlflow.pyfunc.load_model(f"runs:/{mlrun.info.run_id}/model")
    masks = model.predict(np.zeros((1, 40, 48, 3), np.uint8))
    assert masks.shape == (1, 40, 48) and masks.max() <= 1


def test_face_parts_bundle_records_per_class_iou_and_a_34_class_model(
    client, server, pretrain_run, tmp_path, monkeypatch
):
    data = tmp_path / "faces"
    write_face_parts(data / "train", n=2, seed=0)
    write_face_parts(data / "test", n=2, seed=1)
    out = tmp_path / "run"
    common = dict(dataset_dir=str(data), output_dir=str(out), tracking="mlflow", tracking_uri=server)
    run(config_file=str(FACES / "train.json"), pretrained_weights=str(pretrain_run / "models" / "model_ema.pt"),
        preset="tiny", blocks=[5, 6, 7], crop_size=64, max_steps=2, epoch_length=2, warmup_epochs=0, num_heads=2,
        **common)  # fmt: skip
    run(config_file=[str(FACES / "train.json"), str(FACES / "evaluate.json")], window_size=64, **common)
    doc = json.loads((out / "evaluation" / "metrics.json").read_text())
    metrics = _only_run(client, "mdm_face_parts_fewshot", "mdm").data.metrics
    assert metrics["test_mean_iou"] == pytest.approx(doc["mean_iou"])
    per_class = {f"test_iou/{k.replace('***', '/')}": v for k, v in doc["per_class_iou"].items() if v is not None}
    assert per_class and {k: metrics[k] for k in per_class} == pytest.approx(per_class)
    evaluation = _only_run(client, "mdm_face_parts_fewshot", "mdm").info.run_id
    assert {"evaluation/class_iou.csv", "evaluation/legend.png"} <= set(_artifacts(client, evaluation, "evaluation"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    training = _only_run(client, "mdm_face_parts_fewshot", "mdm_train").info.run_id
    masks = mlflow.pyfunc.load_model(f"runs:/{training}/model").predict(np.zeros((1, 64, 64, 3), np.uint8))
    assert masks.shape == (1, 64, 64) and masks.max() < 34


def test_volume_bundle_records_settings_dice_tables_and_a_3d_model(tmp_path, monkeypatch):
    """Tracked with the bundle's default store (``<output_dir>/mlruns.db``): no server needed."""
    from monai.utils import path_to_sqlite_uri

    from monai_mdm.data.synthetic import synthesize_volume, write_volumes
    from monai_mdm.inferers import load_segmentation_model, make_sliding_window_inferer
    from monai_mdm.networks import MDMUNet

    data = write_volumes(tmp_path / "volumes", n_train=1, n_test=1, size=(16, 16, 12), seed=0)  # 16^3 at 1.5 mm
    weights = tmp_path / "unet3d.pt"
    torch.save(MDMUNet.from_preset("tiny3d").state_dict(), weights)  # untrained: only the records matter here
    out = tmp_path / "run"
    common = dict(dataset_dir=str(data), output_dir=str(out), tracking="mlflow")
    run(config_file=str(VOLUME / "train.json"), pretrained_weights=str(weights), label_budget=1, crop_size=16,
        crops_per_image=2, batch_size=1, max_steps=2, epoch_length=2, warmup_epochs=0, **common)  # fmt: skip
    run(config_file=[str(VOLUME / "train.json"), str(VOLUME / "evaluate.json")], window_size=16, overlap=0.0, **common)
    uri = path_to_sqlite_uri(str(out / "mlruns.db"))
    client = mlflow.MlflowClient(uri)

    training = _only_run(client, "mdm_volume_fewshot", "mdm_train")
    run_id = training.info.run_id
    params = training.data.params
    assert params["num_labelled"] == "1" and params["crop_size"] == "16" and params["preset"] == "tiny3d"
    assert params["spacing"] == "[1.5, 1.5, 1.5]" and params["intensity_range"] == "[-160.0, 240.0]"
    assert [m.step for m in client.get_metric_history(run_id, "epoch_loss")] == [1]
    assert len(client.get_metric_history(run_id, "train_loss")) == 2  # 1 volume x 2 crops, batch 1
    assert "model/MLmodel" in _artifacts(client, run_id, "model")

    evaluation = _only_run(client, "mdm_volume_fewshot", "mdm")
    assert evaluation.data.params["window_size"] == "16" and evaluation.data.params["num_cases"] == "1"
    doc = json.loads((out / "evaluation" / "metrics.json").read_text())
    means = {f"test_{k}": v["mean"] for k, v in doc["summary"].items()}
    assert set(means) == {"test_dice_organ", "test_dice_lesion", "test_mean_dice"}
    assert evaluation.data.metrics == pytest.approx(means)
    eval_id = evaluation.info.run_id
    assert _artifacts(client, eval_id, "evaluation") == ["evaluation/metrics.csv", "evaluation/metrics.json"]
    table = client.download_artifacts(eval_id, "evaluation/metrics.csv", str(tmp_path))
    assert Path(table).read_text() == (out / "evaluation" / "metrics.csv").read_text()

    # the logged model segments HU volumes on the training grid as the bundle's network does
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", model_config={"device": "cpu"})
    hu = np.stack([synthesize_volume(i, (16, 16, 24), seed=1)[0] for i in (1, 2)]).astype(np.float32)
    labels = model.predict(hu)
    assert labels.shape == hu.shape and labels.dtype == np.uint8 and labels.max() <= 2
    network = load_segmentation_model(out / "models" / "model.pt", "cpu")
    scaled = torch.from_numpy(np.clip((hu + 160.0) / 400.0 * 2 - 1, -1, 1))[:, None]
    with torch.no_grad():
        expected = make_sliding_window_inferer(roi_size=16, overlap=0.2)(scaled, network).argmax(1).numpy()
    assert np.array_equal(labels, expected)
    # an untrained UNet's features leave the argmax mostly background: check the HU window directly too
    window = model.unwrap_python_model().scale(torch.tensor([-1000.0, -160.0, 40.0, 240.0, 1000.0]))
    assert torch.as_tensor(window).tolist() == pytest.approx([-1.0, -1.0, 0.0, 1.0, 1.0])
    with pytest.raises(Exception, match="volumes|shape"):
        model.predict(hu[0])  # one volume without the batch axis is refused, not misread


@pytest.fixture(scope="module")
def untracked_run(demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("untracked")
    run(config_file=PRETRAIN, dataset_dir=str(demo_data["glas"]), output_dir=str(out), max_iterations=2,
        **TINY_PRETRAIN)  # fmt: skip
    return out


@pytest.mark.parametrize("setting", ["tracking_uri", "MLFLOW_TRACKING_URI"])
def test_unreachable_server_stops_before_training_and_changes_nothing(
    demo_data, untracked_run, tmp_path, monkeypatch, setting
):
    out = tmp_path / "run"
    shutil.copytree(untracked_run, out)  # a run to resume, with tracking this time
    before = {p.name: p.read_bytes() for p in (out / "models").iterdir()}
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    if setting == "tracking_uri":
        overrides, source = {"tracking_uri": uri}, "from the tracking_uri setting"
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        overrides, source = {}, "from the MLFLOW_TRACKING_URI environment variable"
    start = time.time()
    with pytest.raises(Exception) as info:  # MONAI wraps the handler's ConnectionError in a RuntimeError
        run(
            config_file=PRETRAIN, dataset_dir=str(demo_data["glas"]), output_dir=str(out), max_iterations=4,
            tracking="mlflow", **{**TINY_PRETRAIN, **overrides},
        )  # fmt: skip
    assert time.time() - start < 60  # not MLflow's minutes of retries
    assert isinstance(info.value.__cause__, ConnectionError)
    text = error_chain(info.value)
    assert uri in text and source in text and "before its first iteration" in text
    assert {p.name: p.read_bytes() for p in (out / "models").iterdir()} == before


def test_any_http_answer_counts_as_reachable_and_local_stores_are_not_checked(tmp_path):
    """A proxy or server that answers /health with an HTTP error is up; MLflow reports its own errors."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from monai_mdm.handlers import check_tracking_uri

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), NotFound) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        check_tracking_uri(f"http://127.0.0.1:{httpd.server_address[1]}/prefix/", timeout=5)
        httpd.shutdown()
    check_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'mlruns.db'}")
    with pytest.raises(ConnectionError, match=r"'http://127\.0\.0\.1:\d+'.*cannot be reached"):
        check_tracking_uri(f"http://127.0.0.1:{_free_port()}", timeout=2)


def _handler_targets(config_files) -> list[str]:
    parser = ConfigParser()
    parser.read_config(config_files)
    key = "train#handlers" if "train#handlers" in parser else "handlers"
    return [h["_target_"] for h in parser[key] if isinstance(h, dict)]


@pytest.mark.parametrize(
    "configs",
    [
        [b / "configs" / name for name in names]
        for b in sorted(p for p in BUNDLES.iterdir() if (p / "configs" / "train.json").is_file())
        for names in (["train.json"], ["train.json", "evaluate.json"], ["train.json", "train_unet.json"])
        if all((b / "configs" / n).is_file() for n in names)
    ],
    ids=lambda files: "+".join(f"{f.parent.parent.name}/{f.name}" for f in files),
)
def test_every_train_and_evaluate_config_records_to_mlflow(configs):
    """The records above come from handlers in the configs; every bundle lists them."""
    targets = _handler_targets([str(c) for c in configs])
    assert "monai_mdm.handlers.CheckTrackingServer" in targets
    assert "monai_mdm.handlers.LogSettings" in targets
    if "mdm_pretrain" in str(configs[0]):
        assert {"monai_mdm.handlers.ReconstructionGridSaver", "monai_mdm.handlers.LogArtifacts"} <= set(targets)
    elif configs[0].name == "train.json":
        assert {"monai_mdm.handlers.SetTrackedLoss", "monai_mdm.handlers.LogSegmentationModel"} <= set(targets)
    else:
        assert re.search(r"(Segmentation|ClassIoU|Dice)Report", " ".join(targets))
