"""Few-shot head training: the step schedule, the augmented cache, the held-out strip and its early stopping."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine, Events

from monai_mdm.data import FeatureCache, heldout_cache, holdout_split
from monai_mdm.handlers import HeldOutEarlyStopping, StopAtStep, epochs_for_steps
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet


@pytest.fixture(scope="module")
def extractor() -> MDMFeatureExtractor:
    torch.manual_seed(0)
    return MDMFeatureExtractor(MDMUNet.from_preset("tiny"), blocks=(6, 8))


def _pair(h: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(3, h, w, generator=g) * 2 - 1, "label": torch.randint(0, 2, (1, h, w), generator=g)}


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("num_items", [1, 10])
def test_schedule_is_a_number_of_optimiser_steps_whatever_the_data(num_items):
    steps, ends = [], []
    engine = Engine(lambda e, b: steps.append(b))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ends.append(e.state.iteration))
    StopAtStep(7).attach(engine)
    engine.run(list(range(num_items)), max_epochs=epochs_for_steps(7, 3), epoch_length=3)
    assert len(steps) == 7 and engine.state.epoch == 3  # 3 + 3 + a last epoch cut to 1
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ends.append(e.state.iteration))
    StopAtStep(6).attach(engine)
    engine.run(list(range(num_items)), max_epochs=5, epoch_length=3)  # e.g. --max_epochs overridden upwards
    assert engine.state.iteration == 6 and ends[-2:] == [3, 6]  # a full last epoch completes (and is logged)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_max_steps_is_refused_with_the_bound(bad):
    with pytest.raises(ValueError, match=r"max_steps must be an integer >= 1"):
        epochs_for_steps(bad, 25)
    with pytest.raises(ValueError, match=r"max_steps must be an integer >= 1"):
        StopAtStep(bad)
    with pytest.raises(ValueError, match=r"epoch_length must be an integer >= 1"):
        epochs_for_steps(10, 0)


# ---------------------------------------------------------------- augmented cache


def test_cached_views_are_the_features_of_the_flipped_and_rotated_crops(extractor):
    data = [_pair(40, 48)]
    cache = FeatureCache(extractor, data, crop_size=32, crops_per_image=6, fp16=False, seed=1, augment=True)
    assert len(cache.views) == 8 and len({cache.view(i) for i in range(len(cache))}) > 1
    for i in range(len(cache)):
        image_index, window = cache.crop_slices(i)
        k, flip = cache.views[cache.view(i)]
        window = (slice(None), *window)
        crop, label = data[image_index]["image"][window], data[image_index]["label"][window]
        crop, label = torch.rot90(crop, k, dims=(1, 2)), torch.rot90(label, k, dims=(1, 2))
        if flip:
            crop, label = crop.flip(-1), label.flip(-1)
        item = cache[i]
        expected = extractor.extract_blocks(crop[None], [int(item["mask_seed"])])
        for got, want in zip(item["blocks"], expected):
            torch.testing.assert_close(got, want[0])
        assert torch.equal(item["label"].long(), label)
    again = FeatureCache(extractor, data, crop_size=32, crops_per_image=6, fp16=False, seed=1, augment=True)
    assert again.crops == cache.crops  # deterministic under seed


def test_an_image_the_size_of_the_crop_gives_no_identical_copies(extractor, caplog):
    data = [_pair(32, 32)]
    with caplog.at_level(logging.INFO):
        fixed = FeatureCache(extractor, data, crop_size=32, crops_per_image=16, fp16=False, vary_masks=False,
                             augment=True)  # fmt: skip
    assert len(fixed) == 8 and sorted(fixed.view(i) for i in range(8)) == list(range(8))  # one per view
    assert sum("distinct crop views" in r.message for r in caplog.records) == 1
    flat = [torch.cat([b.flatten() for b in fixed[i]["blocks"]]) for i in range(8)]
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i))
    # with a mask per crop, copies differ by their masks: every view used twice before any third time
    varied = FeatureCache(extractor, data, crop_size=32, crops_per_image=16, fp16=False, augment=True)
    assert len(varied) == 16 and sorted(varied.view(i) for i in range(16)) == sorted(list(range(8)) * 2)
    assert len({(varied.view(i), varied.crops[i][2]) for i in range(16)}) == 16
    plain = FeatureCache(extractor, data, crop_size=32, crops_per_image=4, fp16=False, vary_masks=False)
    assert len(plain) == 1  # no augmentation: one distinct crop


# ---------------------------------------------------------------- held-out strip


def _coordinates(h: int, w: int) -> dict[str, torch.Tensor]:
    """An image whose channels are its own row and column (so any crop tells where it came from)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([rows, cols, torch.zeros_like(rows)]).float()
    return {"image": image, "label": torch.randint(0, 3, (1, h, w), generator=torch.Generator().manual_seed(h))}


@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (20, 20), (100, 90)])
def test_held_out_strip_is_never_in_a_training_crop_and_scored_once(shape):
    h, w = shape
    sides = set()
    for seed in range(4):
        item = _coordinates(h, w)
        train, windows = holdout_split([item], 0.2, 32, seed=seed)
        axis = 0 if h > w else 1  # the longest axis (ties: the last)
        width = int(0.2 * shape[axis])
        seen = train[0]["image"][axis].unique().long().tolist()  # training crops are cut from this part only
        held = set(range(shape[axis])) - set(seen)
        ends = (set(range(width)), set(range(shape[axis] - width, shape[axis])))
        assert len(held) == width and held in ends
        sides.add(min(held))
        scored = torch.zeros(h, w, dtype=torch.long)
        for win in windows:
            assert tuple(win["image"].shape[1:]) == (32, 32)
            mask = win["label"][0] != 255
            r, c = win["image"][0][mask].long(), win["image"][1][mask].long()
            scored[r, c] += 1
            assert torch.equal(win["label"][0][mask], item["label"][0, r, c])
        strip = torch.zeros(h, w, dtype=torch.long)
        strip[(slice(None),) * axis + (sorted(held),)] = 1
        assert torch.equal(scored, strip)  # every held-out pixel scored exactly once, nothing else
        again = holdout_split([item], 0.2, 32, seed=seed)
        assert all(torch.equal(a["label"], b["label"]) for a, b in zip(windows, again[1]))
    assert len(sides) == 2  # the end that is held out depends on the seed


def test_too_small_an_image_holds_nothing_out(caplog):
    with caplog.at_level(logging.WARNING):
        train, windows = holdout_split([_pair(4, 4)], 0.2, 32)
    assert windows == [] and tuple(train[0]["image"].shape) == (3, 4, 4)
    assert "no held-out strip" in caplog.text
    with pytest.raises(ValueError, match="holdout_fraction must lie in"):
        holdout_split([_pair(4, 4)], 0.7, 32)
    assert heldout_cache(None, []) == []


# ---------------------------------------------------------------- early stopping on the held-out pixels


def _engine(weights: list[float], data_len: int = 1) -> tuple[Engine, torch.nn.Conv2d]:
    """A trainer stand-in whose 1x1-conv 'network' gets a scripted weight each epoch."""
    net = torch.nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()

    def step(engine, batch):
        with torch.no_grad():
            net.weight[1, 0] = weights[engine.state.epoch - 1]
        return {"loss": torch.tensor(1.0)}

    engine = Engine(step)
    engine.network = net
    engine.prepare_batch = lambda batch, device, non_blocking: (batch["image"], batch["label"])
    return engine, net


def _heldout() -> list[dict[str, torch.Tensor]]:
    # class 1 where the image is positive: a larger weight on channel 1 scores better up to the label noise
    image = torch.tensor([[[1.0, 1.0, -1.0, -1.0]]])
    return [{"image": image, "label": torch.tensor([[[1, 1, 0, 255]]])}]


def test_best_head_is_restored_after_patience_runs_out(caplog):
    # weights 1, 3 (best: most confident and right), then worse: 0, -1, -2 ...
    engine, net = _engine([1.0, 3.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0])
    stopper = HeldOutEarlyStopping(_heldout(), patience=2, batch_size=1)
    stopper.attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run([0], max_epochs=8)
    assert engine.state.epoch == 4  # epochs 3 and 4 did not improve on epoch 2
    assert stopper.best_epoch == 2 and float(net.weight.detach()[1, 0]) == 3.0
    assert engine.state.metrics["heldout_loss"] > -stopper.best_score
    assert "restored the head of epoch 2" in caplog.text


def test_dice_metric_and_warmup():
    engine, net = _engine([-1.0, -2.0, 1.0, 2.0, 0.5, 0.4, 0.3, 0.2])
    stopper = HeldOutEarlyStopping(_heldout(), patience=1, warmup_epochs=2, metric="dice")
    stopper.attach(engine)
    engine.run([0], max_epochs=8)
    # Dice is 0 for epochs 1-2 (warm-up, not checked), 1 from epoch 3 on: epoch 4 does not improve -> stop
    assert engine.state.epoch == 4 and stopper.best_epoch == 3 and float(net.weight.detach()[1, 0]) == 1.0
    assert engine.state.metrics["heldout_dice"] == 1.0
    with pytest.raises(ValueError, match="metric must be"):
        HeldOutEarlyStopping([], metric="iou")


def test_last_short_epoch_is_scored_before_restoring():
    engine, net = _engine([0.0, 0.0, 5.0])
    stopper = HeldOutEarlyStopping(_heldout(), patience=5)
    stopper.attach(engine)
    StopAtStep(5).attach(engine)
    engine.run([0, 1], max_epochs=3)  # epochs of 2, 2 and a last one cut to 1
    assert engine.state.iteration == 5 and stopper.best_iteration == 5 and float(net.weight.detach()[1, 0]) == 5.0


def test_without_held_out_pixels_training_runs_its_length_and_keeps_the_last_weights(caplog):
    engine, net = _engine([3.0, 1.0, 0.0, -1.0])
    HeldOutEarlyStopping([], patience=1).attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run([0], max_epochs=4)
    assert engine.state.epoch == 4 and float(net.weight.detach()[1, 0]) == -1.0
    assert caplog.text.count("no held-out labelled pixels") == 1


@pytest.mark.parametrize(
    "bundle", ["mdm_glas_fewshot", "mdm_monuseg_fewshot", "mdm_face_parts_fewshot", "mdm_volume_fewshot"]
)
def test_bundles_stop_on_held_out_dice_by_default(bundle):
    """Cross entropy on the held-out strip was lowest while a one-image head still called everything
    background, so the bundles watch Dice; --stop_metric loss stays selectable."""
    from monai.bundle import ConfigParser

    from helpers import BUNDLES

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    assert parser["stop_metric"] == "dice"
    stopper = parser["train"]["handlers"][0]
    assert stopper["_target_"].endswith("HeldOutEarlyStopping") and stopper["metric"] == "@stop_metric"
    logged = [h["settings"] for h in parser["train"]["handlers"] if isinstance(h, dict) and "settings" in h]
    assert [s["stop_metric"] for s in logged] == ["@stop_metric"]


def test_a_model_outside_the_trainers_network_is_kept_and_restored_with_it():
    """Fine-tuning trains the UNet inside the extractor, not the trainer's network: both come back from one epoch."""
    engine, net = _engine([1.0, 3.0, 0.0, -1.0, -2.0, -3.0])
    backbone = torch.nn.Linear(1, 1, bias=False)

    def trained_too(engine):
        with torch.no_grad():
            backbone.weight.fill_(float(engine.state.epoch))

    engine.add_event_handler(Events.ITERATION_COMPLETED, trained_too)
    model = torch.nn.ModuleDict({"head": net, "backbone": backbone})
    stopper = HeldOutEarlyStopping(_heldout(), patience=2, batch_size=1, model=model)
    stopper.attach(engine)
    engine.run([0], max_epochs=6)
    assert stopper.best_epoch == 2
    assert float(net.weight.detach()[1, 0]) == 3.0 and float(backbone.weight) == 2.0


def test_non_finite_loss_stops_with_the_iteration_and_saves_no_model(tmp_path):
    from ignite.engine import Engine

    from monai_mdm.handlers import SaveModel, StopOnNonFiniteLoss

    losses = iter([0.5, 0.4, float("inf"), 0.3])
    engine = Engine(lambda e, b: {"loss": torch.tensor(next(losses))})
    StopOnNonFiniteLoss().attach(engine)
    head = torch.nn.Conv2d(2, 2, 1)
    SaveModel(head, tmp_path / "models" / "model.pt", config={"in_channels": 2}).attach(engine)
    with pytest.raises(FloatingPointError, match=r"loss is inf at iteration 3 \(epoch 1\).*saves no model"):
        engine.run(range(4), max_epochs=1)
    assert not (tmp_path / "models" / "model.pt").exists()


@pytest.mark.parametrize("value, what", [(0, "every pixel is background"), (255, "every pixel is ignored")])
def test_labels_without_foreground_are_refused_naming_the_images(value, what):
    from monai_mdm.data import holdout_split

    data = [{"image": torch.zeros(3, 32, 32), "label": torch.full((1, 32, 32), value), "name": f"train_{i}"}
            for i in (3, 7)]
    with pytest.raises(ValueError, match=f"{what}.*all 2 of them \\(train_3, train_7\\).*--label_budget"):
        holdout_split(data, 0.2, 16)
    data[1]["label"][0, 5, 5] = 1  # one foreground pixel anywhere is enough
    holdout_split(data, 0.2, 16)
