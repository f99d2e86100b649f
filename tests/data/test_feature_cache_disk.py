"""FeatureCache with ``disk_dir``: the same items as in memory, read from a file that goes with the cache."""

from __future__ import annotations

import gc
import os
import pickle

import pytest
import torch

from monai_mdm.data import FeatureCache
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet


def _pairs(n=3, size=(40, 48)):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, *size, generator=g) * 2 - 1, torch.randint(0, 2, (1, *size), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def extractor() -> MDMFeatureExtractor:
    torch.manual_seed(0)
    return MDMFeatureExtractor(MDMUNet.from_preset("tiny"), blocks=(3, 5, 7), seed=0)


@pytest.mark.parametrize("fp16", [True, False])
def test_disk_cache_equals_memory_cache(extractor, tmp_path, fp16):
    settings = dict(crop_size=32, crops_per_image=3, fp16=fp16, batch_size=2, seed=1)
    memory = FeatureCache(extractor, _pairs(), **settings)
    disk = FeatureCache(extractor, _pairs(), disk_dir=tmp_path, **settings)
    assert disk.disk_path is not None and os.path.dirname(disk.disk_path) == str(tmp_path)
    assert memory.disk_path is None
    assert len(disk) == len(memory) == 9
    assert disk.nbytes() == memory.nbytes() == FeatureCache.bytes_per_crop(extractor, 32, fp16) * 9
    assert os.path.getsize(disk.disk_path) == sum(sum(b.numel() * b.element_size() for b in memory[i]["blocks"])
                                                  for i in range(len(memory)))  # fmt: skip
    for i in range(len(memory)):
        a, b = memory[i], disk[i]
        assert [t.dtype for t in b["blocks"]] == [t.dtype for t in a["blocks"]]
        assert all(torch.equal(x, y) for x, y in zip(a["blocks"], b["blocks"]))
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["norm"], b["norm"])
    # a DataLoader worker's copy (pickled) reads the same file and never removes it
    copy = pickle.loads(pickle.dumps(disk))
    assert all(torch.equal(x, y) for x, y in zip(copy[4]["blocks"], memory[4]["blocks"]))
    path = disk.disk_path
    del copy
    gc.collect()
    assert os.path.exists(path)
    del disk
    gc.collect()
    assert not os.path.exists(path)  # the file goes with the cache


def test_disk_dir_must_exist(extractor, tmp_path):
    with pytest.raises(ValueError, match="disk_dir .*missing.* is not a directory"):
        FeatureCache(extractor, _pairs(1), crop_size=32, crops_per_image=1, disk_dir=tmp_path / "missing")


def test_full_size_images_are_not_held_while_planning(extractor):
    """Each image is let go once its crops are cut: the cache never holds the whole data set at full size."""
    import weakref

    alive: list[weakref.ref] = []

    class Images:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            gc.collect()
            held = sum(r() is not None for r in alive)  # the previous one may still sit in the loop's iterator
            assert held <= 1, f"image {i} is read while {held} earlier full-size images are still held"
            image = torch.rand(3, 96, 96) * 2 - 1
            alive.append(weakref.ref(image))
            return image, torch.zeros(1, 96, 96, dtype=torch.long)

    cache = FeatureCache(extractor, Images(), crop_size=32, crops_per_image=2)
    assert len(cache) == 8
