"""Whole-slide inference against the tile-wise sliding window, on a small pyramidal slide of embedded GlaS tiles."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from monai_mdm.data import TiffSlideReader, open_slide, tissue_mask, write_synthetic_slide
from monai_mdm.inferers import SlideInferer, load_segmentation_model, make_sliding_window_inferer

WINDOW = 64
# on the windows' grid (64 + 51 k): the splitter's windows are exactly SlidingWindowInferer's
SHAPE = (WINDOW + 51 * 9, WINDOW + 51 * 14)  # 523 x 778


@pytest.fixture(scope="module")
def model(tiny_glas_model):
    return load_segmentation_model(tiny_glas_model)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    return path, write_synthetic_slide(path, SHAPE, mpp=0.62, cell=128, seed=3)


@pytest.fixture(scope="module")
def reference(slide, model):
    """The tile inference: SlidingWindowInferer over the whole level-0 image in memory."""
    image = torch.as_tensor(slide[1].level(1)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        return make_sliding_window_inferer(WINDOW, 0.2, 4)(image, model)[0].numpy()


def test_slide_blend_equals_the_tile_sliding_window_where_windows_ran(slide, model, reference, tmp_path):
    scores, info = SlideInferer(mpp=0.62, window_size=WINDOW).blend(slide[0], model, tmp_path)
    scores = np.asarray(scores[0])
    covered = scores[-1] > 0
    blended = scores[:-1] / np.where(covered, scores[-1], 1.0)
    assert info["level"] == 0 and info["shape"] == SHAPE
    assert 0.2 < covered.mean() < 0.95  # glass windows were not run
    np.testing.assert_allclose(blended[:, covered], reference[:, covered], atol=1e-4)
    # every pixel the tissue mask shows is covered; glass a window away from tissue is not
    assert covered[_tissue(slide[0])].all()
    cells = np.kron(slide[1].cells >= 0, np.ones((128, 128), bool))[: SHAPE[0], : SHAPE[1]]
    assert not covered[~_dilate(cells, WINDOW)].any()


def test_slide_labels_are_the_tile_labels_on_tissue_and_background_elsewhere(slide, model, reference, tmp_path):
    tissue = _tissue(slide[0])
    shift = _balancing_shift(reference, tissue)
    reference = reference + np.array([0.0, shift])[:, None, None]
    calls = []
    counting = _Counting(_Shifted(model, shift), calls)
    info = SlideInferer(mpp=0.62, window_size=WINDOW)(str(slide[0]), counting, str(tmp_path / "out"))
    total = 10 * 15
    assert 0 < info["run"] < total and info["run"] + info["skipped"] == total
    assert sum(calls) == info["run"] + 1  # the windows run, and one probe for the number of classes
    with tifffile.TiffFile(info["output"]) as tif:
        levels = tif.series[0].levels
        labels = levels[0].asarray()
        assert [level.shape for level in levels] == [SHAPE, (262, 389), (131, 195)]
        np.testing.assert_array_equal(levels[1].asarray(), labels[::2, ::2])
        num, den = tif.pages[0].tags["XResolution"].value
        assert num / den == pytest.approx(1e4 / 0.62) and tif.pages[0].tags["ResolutionUnit"].value == 3  # px/cm
    expected = reference.argmax(axis=0)
    ranked = np.sort(reference, axis=0)
    decided = ranked[-1] - ranked[-2] > 1e-3  # the blend's float error cannot flip these pixels
    np.testing.assert_array_equal(labels[tissue & decided], expected[tissue & decided])
    assert 0.2 < labels[tissue].mean() < 0.8
    assert (labels[~_dilate(tissue, WINDOW)] == 0).all()  # no window ran there: background
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["slide_seg.tif"]  # working files removed


def test_openslide_backend_segments_the_slide_as_the_tifffile_reader_does(slide, model, reference, tmp_path):
    """OpenSlide (``--backend openslide``) finds the same levels, resolution and tissue, so the label TIFF is the
    same; and it reads the label TIFF back as a pyramid placed at the slide's resolution."""
    import openslide  # the test extra installs openslide-bin and openslide-python

    shift = _Shifted(model, _balancing_shift(reference, _tissue(slide[0])))
    ours = SlideInferer(mpp=0.62, window_size=WINDOW)(str(slide[0]), shift, str(tmp_path / "tifffile"))
    theirs = SlideInferer(mpp=0.62, window_size=WINDOW, backend="openslide")(str(slide[0]), shift, str(tmp_path / "os"))
    assert (theirs["level"], theirs["run"], theirs["skipped"]) == (ours["level"], ours["run"], ours["skipped"])
    assert theirs["mpp"] == pytest.approx(0.62)
    labels = tifffile.imread(ours["output"])
    assert 0.1 < labels.mean() < 0.9
    np.testing.assert_array_equal(tifffile.imread(theirs["output"]), labels)
    mask = openslide.OpenSlide(ours["output"])
    assert mask.level_dimensions == ((778, 523), (389, 262), (195, 131))
    assert float(mask.properties["openslide.mpp-x"]) == pytest.approx(0.62)


def test_failed_slide_leaves_nothing_under_the_final_name(slide, model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="out of memory"):
        SlideInferer(mpp=0.62, window_size=WINDOW)(str(slide[0]), _Failing(model, after=3), str(out))
    assert list(out.iterdir()) == []


def test_slide_larger_than_the_free_disk_is_refused_before_inference(slide, model, tmp_path, monkeypatch):
    monkeypatch.setattr("monai_mdm.inferers.wsi.shutil.disk_usage", lambda p: type("U", (), {"free": 10**5})())
    calls = []
    with pytest.raises(OSError, match=r"--output_dir '.*': 0.00 GB free, but segmenting '.*slide.tif' \(523x778"):
        SlideInferer(mpp=0.62, window_size=WINDOW)(str(slide[0]), _Counting(model, calls), str(tmp_path / "out"))
    assert sum(calls) == 1 and list((tmp_path / "out").iterdir()) == []


def _balancing_shift(reference, tissue) -> float:
    """The tiny head may call everything one class; shifting the gland score by a constant (which blends
    unchanged) splits the tissue between both classes, so that comparing labels means something."""
    return float(np.median((reference[0] - reference[1])[tissue]))


def _tissue(path) -> np.ndarray:
    """The slide's tissue mask at level 0."""
    reader = TiffSlideReader()
    mask, ratio = tissue_mask(reader, open_slide(path, reader))
    rows, cols = (np.minimum((np.arange(s) / ratio).astype(int), m - 1) for s, m in zip(SHAPE, mask.shape))
    return mask[rows[:, None], cols[None, :]]


def _dilate(mask: np.ndarray, by: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, np.ones((2 * by + 1, 2 * by + 1), bool))


class _Counting(torch.nn.Module):
    def __init__(self, network, calls):
        super().__init__()
        self.network, self.calls = network, calls

    def forward(self, images):
        self.calls.append(images.shape[0])
        return self.network(images)


class _Shifted(torch.nn.Module):
    def __init__(self, network, shift):
        super().__init__()
        self.network, self.shift = network, shift

    def forward(self, images):
        scores = self.network(images)
        return scores + torch.tensor([0.0, self.shift], device=scores.device)[:, None, None]


class _Failing(_Counting):
    def __init__(self, network, after):
        super().__init__(network, [])
        self.after = after

    def forward(self, images):
        if len(self.calls) >= self.after:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().forward(images)


class _IntensityClasses(torch.nn.Module):
    """Three classes by the pixel's mean intensity (dark: nucleus interior, mid: boundary, bright: background);
    pointwise, so the Gaussian blend of overlapping windows gives the same classes."""

    def __init__(self):
        super().__init__()
        self.centres = torch.nn.Parameter(torch.tensor([0.6, -0.4, 0.1]), requires_grad=False)

    def forward(self, images):
        mean = images.mean(dim=1, keepdim=True)
        return -((mean - self.centres[None, :, None, None]) ** 2)


@pytest.mark.parametrize("method", ["watershed", "connected_components"])
def test_slide_nuclei_equal_the_post_processing_of_the_whole_label_map(slide, method, tmp_path):
    """Each nucleus is written once, with the outline the whole label map's post-processing in memory gives it
    (the outlines compared as written: rasterising a file of many nuclei decides pixels on a diagonal contact
    between two of them by the features' order, which tiles change). The slide has nuclei across every seam of
    the 128 px tiles."""
    import json

    from monai_mdm.data import instances_to_geojson
    from monai_mdm.transforms import nucleus_instances

    # the margin spans the largest region of the intensity classes (connected components merge touching nuclei)
    inferer = SlideInferer(mpp=0.62, window_size=WINDOW, tissue_threshold=0, instances=method, nucleus_tile=128,
                           nucleus_margin=100)  # fmt: skip
    info = inferer(str(slide[0]), _IntensityClasses(), str(tmp_path / "out"))
    labels = tifffile.imread(info["output"], level=0)
    whole = nucleus_instances(labels, method)
    assert set(np.unique(labels)) == {0, 1, 2} and info["nuclei"] == whole.max() > 100

    def outlines(features):
        return sorted(json.dumps(f["geometry"]) for f in features)

    written = json.loads(open(info["nuclei_output"]).read())["features"]
    assert outlines(written) == outlines(instances_to_geojson(whole)["features"])
    assert sorted(f["properties"]["measurements"]["Instance id"] for f in written) == list(range(1, whole.max() + 1))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["slide_nuclei.geojson", "slide_seg.tif"]


def test_label_values_merge_classes_in_the_tiff_and_bad_settings_are_refused(slide, tmp_path):
    plain = SlideInferer(mpp=0.62, window_size=WINDOW, tissue_threshold=0)(str(slide[0]), _IntensityClasses(),
                                                                            str(tmp_path / "a"))  # fmt: skip
    merging = SlideInferer(mpp=0.62, window_size=WINDOW, tissue_threshold=0, label_values=[0, 1, 1], instances="none")
    merged = merging(str(slide[0]), _IntensityClasses(), str(tmp_path / "b"))
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["slide_seg.tif"] and "nuclei" not in merged
    with tifffile.TiffFile(merged["output"]) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    np.testing.assert_array_equal(levels[0], tifffile.imread(plain["output"], level=0) > 0)
    np.testing.assert_array_equal(levels[1], levels[0][::2, ::2])  # the sub-levels hold the merged values too
    with pytest.raises(ValueError, match="--instances must be one of watershed, connected_components, none; got 'x'"):
        SlideInferer(instances="x")
    short = r"--label_values \[0, 1\]: one value per class needed, the network predicts 3"
    with pytest.raises(ValueError, match=short):
        SlideInferer(mpp=0.62, window_size=WINDOW, label_values=[0, 1])(str(slide[0]), _IntensityClasses(),
                                                                         str(tmp_path / "c"))  # fmt: skip
    assert list((tmp_path / "c").iterdir()) == []
