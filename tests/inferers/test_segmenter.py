"""MDMSegmenter with sliding windows, save/load, and head training on cached (assembled or blockwise) vs online
features."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader

from monai_mdm.data import FeatureCache
from monai_mdm.engines import CachedFeaturePrepareBatch, OnlineFeaturePrepareBatch
from monai_mdm.inferers import MDMSegmenter, make_sliding_window_inferer
from monai_mdm.networks import BlockwiseHead, MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble, PixelMLPHead

BLOCKS = (5, 6, 7, 8)


@pytest.fixture(scope="module")
def net() -> MDMUNet:
    torch.manual_seed(0)
    return MDMUNet.from_preset("tiny")


@pytest.fixture()
def segmenter(net) -> MDMSegmenter:
    torch.manual_seed(1)
    ex = MDMFeatureExtractor(net, blocks=BLOCKS, seed=3)
    head = PixelHeadEnsemble(ex.out_channels, 2, num_heads=3)
    return MDMSegmenter(ex, head, class_names=["background", "gland"]).eval()


def _synthetic(n=3, size=(48, 56), seed=0):
    """Images with one bright rectangle on a dark background; label = the rectangle (trivially separable)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        label = torch.zeros(1, *size, dtype=torch.long)
        y, x = (int(torch.randint(0, s // 2, (1,), generator=g)) for s in size)
        label[:, y : y + size[0] // 2, x : x + size[1] // 2] = 1
        image = torch.where(label.bool(), 0.7, -0.7).float().expand(3, *size).clone()
        image += 0.05 * torch.randn(3, *size, generator=g)
        pairs.append((image, label))
    return pairs


def test_sliding_window_full_size_output(segmenter):
    inferer = make_sliding_window_inferer(roi_size=32, overlap=0.2, sw_batch_size=2)
    with torch.no_grad():
        big = inferer(torch.rand(1, 3, 40, 72) * 2 - 1, segmenter)  # non-square, larger than the window
        small = inferer(torch.rand(2, 3, 20, 24) * 2 - 1, segmenter)  # smaller than the window: MONAI pads
    assert big.shape == (1, 2, 40, 72)
    assert small.shape == (2, 2, 20, 24)
    assert torch.allclose(big.sum(dim=1), torch.ones(1, 40, 72), atol=1e-4)
    labels = segmenter.segment(torch.rand(1, 3, 36, 44) * 2 - 1)  # direct: padded to a multiple of 8, cropped
    assert labels.shape == (1, 1, 36, 44)


def test_save_load_round_trip(segmenter, tmp_path):
    path = tmp_path / "seg.pt"
    segmenter.save(path)
    loaded = MDMSegmenter.load(path)
    assert loaded.class_names == ["background", "gland"] and loaded.extractor.blocks == BLOCKS
    assert loaded.extractor.seed == 3 and loaded.head.num_heads == 3
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(segmenter(x), loaded(x))


def test_finetuned_flag_is_recorded_and_optional(segmenter, tmp_path):
    state = segmenter.to_state()
    assert state["features"]["finetuned"] is False
    torch.manual_seed(0)
    ex = MDMFeatureExtractor(MDMUNet.from_preset("tiny"), blocks=BLOCKS, trainable=True)
    tuned = MDMSegmenter(ex, PixelMLPHead(ex.out_channels, 2))
    tuned.save(tmp_path / "tuned.pt")
    loaded = MDMSegmenter.load(tmp_path / "tuned.pt")
    assert loaded.finetuned and not loaded.extractor.trainable  # served frozen, still marked fine-tuned
    assert loaded.to_state()["features"]["finetuned"] is True
    del state["features"]["finetuned"]  # files written before the flag existed
    assert not MDMSegmenter.from_state(state).finetuned


def test_mismatched_head_names_file(segmenter, tmp_path):
    path = tmp_path / "bad.pt"
    state = segmenter.to_state()
    state["features"]["blocks"] = [6, 7, 8]  # as if the head had been trained on other blocks
    torch.save(state, path)
    with pytest.raises(ValueError, match="bad.pt") as err:
        MDMSegmenter.load(path)
    msg = str(err.value)
    assert "160" in msg and "96" in msg and "other decoder blocks" in msg
    good = tmp_path / "good.pt"
    segmenter.save(good, include_network=False)
    with pytest.raises(ValueError, match="good.pt.*160.*96"):
        MDMSegmenter.load(good, network=segmenter.extractor.network, blocks=(6, 7, 8))
    with pytest.raises(ValueError, match="160"):
        MDMSegmenter(MDMFeatureExtractor(segmenter.extractor.network, blocks=(6, 7, 8)), segmenter.head)


def test_cached_equals_online(net):
    ex = MDMFeatureExtractor(net, blocks=BLOCKS, seed=0)
    pairs = _synthetic(2)
    cache = FeatureCache(ex, pairs, crop_size=32, crops_per_image=3, fp16=False, batch_size=2, seed=5)
    assert len(cache) == 6
    assert cache.nbytes() == 6 * FeatureCache.bytes_per_crop(ex, 32, fp16=False)
    idx = [1, 4]
    crops = [pairs[cache.crop_slices(i)[0]] for i in idx]
    images = torch.stack([im[(slice(None), *cache.crop_slices(i)[1])] for (im, _), i in zip(crops, idx)])
    labels = torch.stack([lb[(slice(None), *cache.crop_slices(i)[1])] for (_, lb), i in zip(crops, idx)])
    batch = torch.utils.data.default_collate([cache[i] for i in idx])
    cached, cached_labels = CachedFeaturePrepareBatch(ex, blockwise=False)(batch)
    online_batch = {"image": images, "label": labels, "mask_seed": batch["mask_seed"]}
    online, online_labels = OnlineFeaturePrepareBatch(ex, seed_key="mask_seed")(online_batch)
    assert cached.shape == (2, ex.out_channels, 32, 32) and cached_labels.shape == (2, 32, 32)
    assert cached_labels.dtype == torch.long and torch.equal(cached_labels, online_labels)
    assert torch.allclose(cached, online, rtol=0, atol=1e-7)
    # without per-crop seeds, the extractor's fixed seed applies on both paths
    plain = FeatureCache(ex, pairs[:1], crop_size=32, crops_per_image=1, fp16=False, vary_masks=False, seed=5)
    im = pairs[0][0][(slice(None), *plain.crop_slices(0)[1])][None]
    cached1, _ = CachedFeaturePrepareBatch(ex, blockwise=False)(torch.utils.data.default_collate([plain[0]]))
    assert torch.allclose(cached1, ex(im), rtol=0, atol=1e-7)
    # fp16 cache: same norms, features within half precision
    half = FeatureCache(ex, pairs[:1], crop_size=32, crops_per_image=1, fp16=True, vary_masks=False, seed=5)
    assert half.nbytes() < plain.nbytes()
    cached16, _ = CachedFeaturePrepareBatch(ex, blockwise=False)(torch.utils.data.default_collate([half[0]]))
    assert torch.allclose(cached16, cached1, atol=1e-4)


def test_blockwise_prepare_batch(net):
    ex = MDMFeatureExtractor(net, blocks=BLOCKS, seed=0)
    cache = FeatureCache(ex, _synthetic(2), crop_size=32, crops_per_image=2, fp16=True, seed=1)
    batch = torch.utils.data.default_collate([cache[0], cache[3]])
    blocks, labels, args, kwargs = CachedFeaturePrepareBatch(ex)(batch)  # blockwise is the default
    assert args == () and set(kwargs) == {"spatial_size", "norms"}
    assert kwargs["spatial_size"] == (32, 32) and labels.shape == (2, 32, 32) and labels.dtype == torch.long
    assert [tuple(b.shape) for b in blocks] == [(2, *s) for s in ex.native_shapes((32, 32))]
    assert blocks[0].dtype == torch.float16  # cast in the head, not copied here
    assert torch.equal(kwargs["norms"], batch["norm"]) and kwargs["norms"].dtype == torch.float32
    features, labels2 = CachedFeaturePrepareBatch(ex, blockwise=False)(batch)
    assert torch.equal(labels, labels2)
    torch.manual_seed(0)
    head = PixelMLPHead(ex.out_channels, 2).eval()
    assert torch.allclose(BlockwiseHead(head)(blocks, *args, **kwargs), head(features), rtol=1e-4, atol=1e-6)
    # no stored norms: computed from the blocks, as assemble does
    no_norm = {k: v for k, v in batch.items() if k != "norm"}
    recomputed = CachedFeaturePrepareBatch(ex)(no_norm)[3]["norms"]
    assert torch.allclose(recomputed, batch["norm"], rtol=1e-3)  # fp16 blocks vs the exact fp32 norms
    # an extractor that does not normalise ignores the stored norms on both paths
    raw = MDMFeatureExtractor(net, blocks=BLOCKS, seed=0, normalize=False)
    assert CachedFeaturePrepareBatch(raw)(batch)[3]["norms"] is None
    with pytest.raises(ValueError, match="expected 4 blocks"):
        CachedFeaturePrepareBatch(ex)({**batch, "blocks": batch["blocks"][:3]})


def _train_on_cache(ex, cache, blockwise: bool, epochs: int = 15):
    """Train a fresh head (seed 0) with SupervisedTrainer on the cache; per-iteration losses and the head."""
    loader = DataLoader(cache, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    head = PixelMLPHead(ex.out_channels, 2)
    losses: list[float] = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=BlockwiseHead(head) if blockwise else head,
        optimizer=torch.optim.Adam(head.parameters(), lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(ignore_index=255),
        prepare_batch=CachedFeaturePrepareBatch(ex, blockwise=blockwise),
        decollate=False,
    )

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        losses.append(float(engine.state.output["loss"]))
        if blockwise:  # the trainer keeps the block list as its "image"
            assert isinstance(engine.state.output["image"], list)

    trainer.run()
    return losses, head, loader


def test_head_training_on_cache_reduces_loss(net):
    ex = MDMFeatureExtractor(net, blocks=BLOCKS, seed=0)
    cache = FeatureCache(ex, _synthetic(4), crop_size=32, crops_per_image=2, seed=0)
    runs = {mode: _train_on_cache(ex, cache, blockwise=mode) for mode in (False, True)}
    for losses, _, _ in runs.values():
        assert len(losses) == 30
        first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
        assert last < 0.5 * first, (first, last)
    assembled, blockwise = runs[False][0], runs[True][0]
    # same batches, same initial head: the first step's loss agrees to rounding, and the runs stay together
    assert abs(assembled[0] - blockwise[0]) <= 1e-4 * abs(assembled[0])
    assert max(abs(a - b) for a, b in zip(assembled, blockwise)) < 0.02 * assembled[0]

    # Normalised features are ~1e-3 in size, so after only 30 steps the BatchNorm running variance still
    # remembers its initial 1; re-estimate the statistics (cumulative average) before evaluating.
    _, head, loader = runs[True]
    prepare = CachedFeaturePrepareBatch(ex)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for batch in loader:
            blocks, _, args, kwargs = prepare(batch)
            head.forward_blocks(blocks, *args, **kwargs)
    seg = MDMSegmenter(ex, head, ["bg", "fg"]).eval()  # the plain head, trained blockwise, on assembled features
    image, label = _synthetic(1, size=(32, 32), seed=9)[0]
    pred = seg.segment(image[None])
    assert (pred[0] == label).float().mean() > 0.9
