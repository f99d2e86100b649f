"""The nucleus boundary target and the post-processing that splits touching nuclei (monai_mdm.transforms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk

from monai_mdm.transforms import (
    NucleusBoundaryTarget,
    NucleusBoundaryTargetd,
    NucleusInstances,
    check_instance_method,
    nucleus_instances,
)


def touching_discs(shape=(40, 64), radius=9, gap=17) -> np.ndarray:
    """Two discs whose pixels meet along a seam (4-adjacent), as crowded nuclei do."""
    inst = np.zeros(shape, np.int32)
    for k, cx in enumerate((20, 20 + gap), start=1):
        rr, cc = disk((20, cx), radius, shape=shape)
        free = inst[rr, cc] == 0
        inst[rr[free], cc[free]] = k
    return inst


def test_two_touching_discs_are_two_nuclei_by_watershed_and_one_by_connected_components():
    inst = touching_discs()
    classes = NucleusBoundaryTarget()(inst)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert nucleus_instances(classes, "connected_components").max() == 1
    split = nucleus_instances(classes, "watershed")
    assert split.max() == 2
    np.testing.assert_array_equal(split, inst)  # every boundary pixel goes back to its own nucleus


def test_boundary_target_separates_interiors_of_touching_nuclei():
    inst = touching_discs()
    target = NucleusBoundaryTarget()(inst[None])
    assert target.shape == (1, *inst.shape) and target.dtype == np.uint8
    np.testing.assert_array_equal(target[0] > 0, inst > 0)  # nucleus = interior + boundary
    seam = (inst[:, 1:] != inst[:, :-1]) & (inst[:, 1:] > 0) & (inst[:, :-1] > 0)
    rows, cols = np.nonzero(seam)
    assert rows.size and np.all(target[0][rows, cols] == 2) and np.all(target[0][rows, cols + 1] == 2)
    from scipy import ndimage as ndi

    assert ndi.label(target[0] == 1)[1] == 2


def test_watershed_keeps_a_nucleus_too_small_for_an_interior_and_drops_nothing():
    classes = np.zeros((20, 20), np.uint8)
    classes[2:4, 2:4] = 2  # boundary only: no marker of its own
    classes[10:16, 10:16] = 2
    classes[11:15, 11:15] = 1
    inst = nucleus_instances(classes, "watershed")
    assert inst.max() == 2 and np.array_equal(inst > 0, classes > 0)


def test_a_speck_of_interior_seeds_no_extra_nucleus():
    inst = touching_discs()
    classes = NucleusBoundaryTarget()(inst)
    classes[20, 28] = 1  # one noisy interior pixel on the seam
    assert nucleus_instances(classes, "watershed", min_marker_size=3).max() == 2


def test_dictionary_target_replaces_the_label_with_its_type():
    inst = touching_discs()
    d = {"label": torch.as_tensor((inst > 0)[None].astype(np.uint8)), "label_instances": inst[None]}
    out = NucleusBoundaryTargetd(keys="label")(d)
    assert isinstance(out["label"], torch.Tensor) and out["label"].dtype == torch.uint8
    assert set(torch.unique(out["label"]).tolist()) == {0, 1, 2}
    assert out["label_instances"] is d["label_instances"]
    # a class map alone (MONAI Label's labels): its connected nuclei get their rings
    alone = NucleusBoundaryTargetd(keys="label")({"label": d["label"]})["label"]
    expected = NucleusBoundaryTarget()((inst > 0).astype(np.int32)[None])
    np.testing.assert_array_equal(alone.numpy(), expected)


def test_array_transform_keeps_the_channel_axis_and_type():
    classes = torch.as_tensor(NucleusBoundaryTarget()(touching_discs())[None])
    out = NucleusInstances("watershed")(classes)
    assert isinstance(out, torch.Tensor) and out.shape == classes.shape and int(out.max()) == 2


@pytest.mark.parametrize("bad", ["watershedd", "cc", ""])
def test_an_unknown_instance_method_is_refused_naming_the_setting(bad):
    with pytest.raises(ValueError, match=r"--instances must be one of watershed, connected_components"):
        check_instance_method(bad)
    with pytest.raises(ValueError, match=r"--instances"):
        NucleusInstances(bad)
