"""The MDM prepare-batch and the training-loop handlers, without a bundle around them."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from monai_mdm.engines import ObjectivePrepareBatch
from monai_mdm.handlers import EMA, StopAtIteration
from monai_mdm.losses import reconstruction_loss
from monai_mdm.transforms import PatchMasking, objective


@pytest.mark.parametrize("as_dict", [True, False])
def test_prepare_batch_masks_on_device_and_returns_timesteps(as_dict):
    torch.manual_seed(0)
    clean = torch.rand(6, 3, 32, 32) + 1.0  # strictly positive so masked pixels (0) are visible
    prepare = ObjectivePrepareBatch(objective("mdm", patch_size=8, num_timesteps=1000))
    masked, target, args, kwargs = prepare({"image": clean} if as_dict else clean, torch.device("cpu"))
    assert torch.equal(target, clean) and args == ()
    t = kwargs["timesteps"]
    assert t.shape == (6,) and t.dtype == torch.long and bool(((t >= 0) & (t < 1000)).all())
    # per sample exactly floor(L * (1 - t / T)) of the L = 16 patches survive
    kept_pixels = (masked != 0).all(dim=1).flatten(1).sum(1)
    expected = (16 * (1000 - t)) // 1000 * 64
    assert torch.equal(kept_pixels, expected)


def test_prepare_batch_names_a_missing_image_key():
    with pytest.raises(KeyError, match="img"):
        ObjectivePrepareBatch(objective("mdm"), image_key="img")({"image": torch.zeros(1, 1, 8, 8)})


@pytest.mark.parametrize("name, expected", [("ssim", "SSIMLoss"), ("MSE", "MSELoss"), ("l1", "L1Loss")])
def test_reconstruction_loss_names(name, expected):
    loss = reconstruction_loss(name)
    assert type(loss).__name__ == expected
    x = torch.rand(2, 3, 16, 16)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-5)


def test_reconstruction_loss_unknown_name():
    with pytest.raises(ValueError, match="ssim"):
        reconstruction_loss("perceptual")


def test_ema_updates_once_per_optimiser_step():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.5, every=2, warmup=False)
    engine = Engine(lambda e, b: model.weight.data.add_(1.0))
    ema.attach(engine)
    engine.run([0] * 4, max_epochs=1)
    # weights after iterations 2 and 4 are 2 and 4; EMA: 0.5 * 0 + 0.5 * 2 = 1, then 0.5 * 1 + 0.5 * 4 = 2.5
    assert float(ema.ema_model.weight) == pytest.approx(2.5)
    assert ema.state_dict() == {"decay": 0.5, "warmup": False, "updates": 2, "init_weight": 0.25}
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_ema_warmup_uses_the_smaller_decay_and_resumes_from_its_count():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.2)
    engine = Engine(lambda e, b: model.weight.data.add_(1.0))
    ema.attach(engine)
    engine.run([0] * 2, max_epochs=1)
    # decays min(0.2, 1/10) = 0.1, then min(0.2, 2/11) = 2/11: EMA 0.9 * 1 = 0.9, then 2/11 * 0.9 + 9/11 * 2
    assert float(ema.ema_model.weight) == pytest.approx(2 / 11 * 0.9 + 9 / 11 * 2)
    assert ema.state_dict() == {"decay": 0.2, "warmup": True, "updates": 2, "init_weight": pytest.approx(0.1 * 2 / 11)}
    assert ema.current_decay() == pytest.approx(0.2)  # 3/12 > 0.2: the long-run decay from here on
    resumed = EMA(model, decay=0.2)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.updates == 2 and resumed.current_decay() == pytest.approx(0.2)
    assert EMA(model, decay=0.2).current_decay() == pytest.approx(0.1)  # a fresh one starts the warm-up


def test_stop_at_iteration_ends_mid_epoch():
    engine = Engine(lambda e, b: None)
    StopAtIteration(7).attach(engine)
    engine.run(range(5), max_epochs=10)
    assert engine.state.iteration == 7
