"""Metrics against hand-computed cases; the arithmetic is in the comments next to each expectation.

Coordinates below are "rows a-b, cols c-d", both ends inclusive.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import directed_hausdorff

from monai_mdm.metrics import (
    GLAS_KEYS,
    MONUSEG_KEYS,
    MetricTable,
    aji,
    binarise,
    evaluate_case,
    gland_object_dice,
    gland_object_hausdorff,
    instances_from_binary,
    panoptic_quality,
    paper_binary_aji,
    paper_dice,
    paper_iou_from_dice,
)


def box(shape, rows, cols, value=1, out=None):
    """Fill rows[0]..rows[1], cols[0]..cols[1] (inclusive) with ``value``."""
    a = np.zeros(shape, dtype=np.int32) if out is None else out
    a[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = value
    return a


def touching_nuclei():
    """gt: nucleus 1 rows 2-5 cols 1-4 (16 px), nucleus 2 rows 2-5 cols 5-8 (16 px), touching.
    Prediction: their union as one semantic blob (32 px), i.e. the two nuclei merged."""
    gt = box((10, 10), (2, 5), (1, 4), 1)
    box(None, (2, 5), (5, 8), 2, out=gt)
    pred = box((10, 10), (2, 5), (1, 8), 1)
    return pred, gt


def merged_glands():
    """gt: G1 rows 0-1 cols 0-3 (8 px), G2 rows 0-3 cols 6-9 (16 px).
    Prediction S rows 0-2 cols 0-9 (30 px) bridges both: S & G1 = 8, S & G2 = rows 0-2 cols 6-9 = 12."""
    gt = box((10, 10), (0, 1), (0, 3), 1)
    box(None, (0, 3), (6, 9), 2, out=gt)
    pred = box((10, 10), (0, 2), (0, 9), 1)
    return pred, gt


# --------------------------------------------------------------------------------- paper protocol


def test_paper_dice_and_iou_from_dice():
    # pred rows 0-2 cols 0-3 (12 px), label rows 1-3 cols 0-3 (12 px, two instance ids), overlap rows 1-2 = 8 px
    pred = box((6, 6), (0, 2), (0, 3), 3)  # any value > 0 is foreground
    label = box((6, 6), (1, 3), (0, 1), 1)
    box(None, (1, 3), (2, 3), 2, out=label)
    d = paper_dice(pred, label)
    assert d == pytest.approx(2 * 8 / 24)  # = 2/3
    # IoU = 8 / (12 + 12 - 8) = 1/2, and D / (2 - D) = (2/3) / (4/3) = 1/2
    assert paper_iou_from_dice(d) == pytest.approx(0.5)
    np.testing.assert_allclose(paper_iou_from_dice(np.array([0.0, 2 / 3, 1.0])), [0.0, 0.5, 1.0])
    # torch tensors and a leading channel axis are accepted
    assert paper_dice(torch.as_tensor(pred)[None], torch.as_tensor(label)) == pytest.approx(2 / 3)


def test_paper_dice_degenerate_cases():
    empty, blob = np.zeros((6, 6), int), box((6, 6), (1, 2), (1, 2))
    assert paper_dice(empty, empty) == 1.0  # nothing to find, nothing predicted: a correct answer
    assert paper_dice(empty, empty, empty_value=float("nan")) != paper_dice(empty, empty, empty_value=0.0)
    assert paper_dice(empty, blob) == 0.0  # missed everything: 0 / 4
    assert paper_dice(blob, empty) == 0.0  # all false positive: 0 / 4
    assert paper_binary_aji(empty, empty) == 1.0
    assert paper_binary_aji(blob, empty) == 0.0
    with pytest.raises(ValueError):
        paper_dice(np.zeros((6, 6)), np.zeros((6, 5)))


def test_paper_binary_aji_is_foreground_iou():
    pred = box((6, 6), (0, 2), (0, 3), 1)
    label = box((6, 6), (1, 3), (0, 1), 1)
    box(None, (1, 3), (2, 3), 2, out=label)  # two instances; binarising makes them one
    fg_iou = 8 / (12 + 12 - 8)
    assert paper_binary_aji(pred, label) == pytest.approx(fg_iou)
    assert paper_binary_aji(pred, label) == pytest.approx(paper_iou_from_dice(paper_dice(pred, label)))


def test_binarising_merged_nuclei_keeps_paper_aji_high_but_real_aji_drops():
    pred_sem, gt = touching_nuclei()
    assert paper_dice(pred_sem, gt) == 1.0  # same foreground
    assert paper_binary_aji(pred_sem, gt) == 1.0
    pred = instances_from_binary(pred_sem)
    assert pred.max() == 1  # the merge: one predicted object for two nuclei
    # real AJI: nucleus 1 -> merged P: I = 16, U = 32; nucleus 2 -> P again: I = 16, U = 32. AJI = 32 / 64
    assert aji(pred, gt) == pytest.approx(0.5)
    # PQ: IoU 16/32 = 0.5 is not > 0.5, so no match: TP 0, FP 1, FN 2
    assert panoptic_quality(pred, gt) == {"pq": 0.0, "dq": 0.0, "sq": 0.0, "tp": 0, "fp": 1, "fn": 2}


def test_paper_object_dice_is_pixel_dice():
    # The public code binarised before its "object Dice": the whole foreground is one object (label 1),
    # and with one object per map the object Dice is 0.5 * (Dice + Dice) = pixel Dice.
    pred = box((10, 10), (1, 5), (1, 5), 1)  # 25 px
    gt = box((10, 10), (3, 7), (2, 6), 4)  # 25 px, overlap rows 3-5 x cols 2-5 = 12
    assert gland_object_dice(binarise(pred).astype(int), binarise(gt).astype(int)) == pytest.approx(24 / 50)
    assert paper_dice(pred, gt) == pytest.approx(24 / 50)
    # It holds for any maps once binarised to a single label, e.g. two gt glands and a merged prediction
    pred, gt = merged_glands()
    one_obj = gland_object_dice(binarise(pred).astype(int), binarise(gt).astype(int))
    assert one_obj == pytest.approx(paper_dice(pred, gt))
    # ...but not the challenge's object Dice on the instances (see test_gland_object_dice_merged_prediction)
    assert gland_object_dice(pred, gt) < one_obj - 0.2


# --------------------------------------------------------------------------------- instances


def test_instances_from_binary_connectivity_and_min_size():
    m = np.zeros((6, 6), int)
    m[0, 0] = m[1, 1] = 1  # diagonal neighbours
    m[4:6, 3:6] = 2  # 6 px block
    assert instances_from_binary(m).max() == 2  # 8-neighbourhood: the diagonal pair is one object
    assert instances_from_binary(m, connectivity=1).max() == 3  # 4-neighbourhood: it is two
    small_removed = instances_from_binary(m, min_size=3, connectivity=1)
    assert small_removed.max() == 1 and small_removed[0, 0] == 0 and set(np.unique(small_removed)) == {0, 1}
    assert (small_removed > 0).sum() == 6
    assert instances_from_binary(np.zeros((4, 4))).max() == 0


def test_gland_object_dice_merged_prediction():
    pred, gt = merged_glands()
    # gt side: w1 = 8/24 = 1/3, w2 = 16/24 = 2/3; both glands' best match is S.
    #   Dice(G1, S) = 2*8 / (8 + 30) = 8/19, Dice(G2, S) = 2*12 / (16 + 30) = 12/23
    #   term_g = (1/3)(8/19) + (2/3)(12/23) = 8/57 + 8/23 = 640/1311
    # pred side: S overlaps G2 most (12 > 8): term_s = 1 * 12/23 = 684/1311
    # object Dice = 0.5 * (640 + 684) / 1311 = 662/1311
    assert gland_object_dice(pred, gt) == pytest.approx(662 / 1311)
    assert gland_object_dice(gt, gt) == 1.0
    assert gland_object_dice(gt * 7, gt) == 1.0  # label values do not matter


def test_gland_object_dice_unmatched_and_degenerate():
    g = box((10, 10), (0, 1), (0, 3), 1)  # 8 px
    s = box((10, 10), (0, 1), (0, 3), 1)
    box(None, (6, 7), (6, 7), 2, out=s)  # extra 4 px false positive, no overlap
    # gt side: 1 * Dice 1 = 1; pred side: (8/12) * 1 + (4/12) * 0 = 2/3; total 0.5 * (1 + 2/3) = 5/6
    assert gland_object_dice(s, g) == pytest.approx(5 / 6)
    empty = np.zeros((10, 10), int)
    assert gland_object_dice(empty, empty) == 1.0
    assert gland_object_dice(empty, g) == 0.0
    assert gland_object_dice(g, empty) == 0.0


def test_gland_object_hausdorff_shifted_squares():
    g = box((10, 10), (2, 4), (2, 4))
    # shifted right by 2 (overlap col 4): the far columns are 2 apart both ways -> 2
    assert gland_object_hausdorff(box((10, 10), (2, 4), (4, 6)), g) == pytest.approx(2.0)
    # shifted by (1, 1): corner (2, 2) of g is sqrt(2) from (3, 3), symmetric -> sqrt(2)
    assert gland_object_hausdorff(box((10, 10), (3, 5), (3, 5)), g) == pytest.approx(math.sqrt(2))
    assert gland_object_hausdorff(g, g) == 0.0


def test_gland_object_hausdorff_unmatched_uses_nearest_object():
    g = box((10, 10), (0, 2), (0, 2))
    s = box((10, 10), (0, 2), (0, 2), 1)
    box(None, (0, 2), (7, 9), 2, out=s)  # false positive 5 columns away
    # gt side: H(G1, S1) = 0. pred side: S1 -> 0; S2 overlaps nothing, nearest gt G1 at H = 9 - 2 = 7.
    # weights 9/18 each: 0.5 * (0 + 0.5 * 0 + 0.5 * 7) = 1.75
    assert gland_object_hausdorff(s, g) == pytest.approx(1.75)

    # two gt glands, one prediction overlapping neither
    g = box((10, 10), (0, 2), (0, 2), 1)
    box(None, (7, 9), (0, 2), 2, out=g)
    s = box((10, 10), (0, 2), (5, 7))
    # H(G1, S) = 5 (same rows, cols shifted by 5); H(G2, S) = |(9,0)-(2,5)| = sqrt(49 + 25) = sqrt(74)
    # gt side: 0.5 * 5 + 0.5 * sqrt(74); pred side: nearest of S is G1 -> 5
    expected = 0.5 * (0.5 * 5 + 0.5 * math.sqrt(74) + 5)
    assert gland_object_hausdorff(s, g) == pytest.approx(expected)


def test_gland_object_hausdorff_matches_scipy_on_pixel_sets():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = np.zeros((12, 12), int)
        b = np.zeros((12, 12), int)
        r, c = rng.integers(0, 7, 2)
        a[r : r + rng.integers(2, 6), c : c + rng.integers(2, 6)] = 1
        r, c = rng.integers(0, 7, 2)
        b[r : r + rng.integers(2, 6), c : c + rng.integers(2, 6)] = 1
        pa, pb = np.argwhere(a > 0), np.argwhere(b > 0)
        h = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
        assert gland_object_hausdorff(a, b) == pytest.approx(h)  # one object each: both terms are H


def _object_hausdorff_by_the_formula(s, g):
    """Slow reference: every H from pixel coordinates with scipy, partners exactly as the challenge defines."""

    def h(a, b):
        pa, pb = np.argwhere(a), np.argwhere(b)
        return max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])

    def side(x, y):  # sum over objects of x of w * H(object, partner in y)
        ids_x, ids_y = [i for i in np.unique(x) if i], [j for j in np.unique(y) if j]
        total = 0.0
        for i in ids_x:
            xi = x == i
            overlap = [((y == j) & xi).sum() for j in ids_y]
            if max(overlap) > 0:
                d = h(xi, y == ids_y[int(np.argmax(overlap))])
            else:
                d = min(h(xi, y == j) for j in ids_y)
            total += xi.sum() / (x > 0).sum() * d
        return total

    return 0.5 * (side(g, s) + side(s, g))


def test_gland_object_hausdorff_matches_formula_on_random_maps():
    rng = np.random.default_rng(3)

    def rectangles(n):  # n random rectangles, later ones painted over earlier ones
        a = np.zeros((20, 20), int)
        for k in range(1, n + 1):
            r, c = rng.integers(0, 17, 2)
            a[r : r + rng.integers(1, 6), c : c + rng.integers(1, 6)] = k
        return a

    for _ in range(4):
        g, s = rectangles(5), rectangles(6)
        assert gland_object_hausdorff(s, g) == pytest.approx(_object_hausdorff_by_the_formula(s, g))


def test_gland_object_hausdorff_degenerate():
    empty, g = np.zeros((10, 10), int), box((10, 10), (2, 4), (2, 4))
    assert gland_object_hausdorff(empty, empty) == 0.0
    assert gland_object_hausdorff(empty, g) == pytest.approx(9 * math.sqrt(2))  # image diagonal
    assert gland_object_hausdorff(g, empty) == pytest.approx(9 * math.sqrt(2))
    assert gland_object_hausdorff(empty, g, empty_value=float("inf")) == float("inf")


def split_and_merge():
    """gt: G1 rows 0-1 cols 0-3 (8), G2 rows 0-1 cols 4-7 (8), touching; G3 rows 5-8 cols 0-3 (16).
    pred: M rows 0-1 cols 0-7 (16) merges G1+G2; G3 split into T1 col 0 (4 px) and T2 cols 1-3 (12 px)."""
    gt = box((10, 10), (0, 1), (0, 3), 1)
    box(None, (0, 1), (4, 7), 2, out=gt)
    box(None, (5, 8), (0, 3), 3, out=gt)
    pred = box((10, 10), (0, 1), (0, 7), 1)
    box(None, (5, 8), (0, 0), 2, out=pred)
    box(None, (5, 8), (1, 3), 3, out=pred)
    return pred, gt


def test_aji_split_and_merge():
    pred, gt = split_and_merge()
    # G1 -> M (IoU 8/16): I 8, U 16. G2 -> M again: I 8, U 16. G3 -> T2 (IoU 12/16 > 4/16): I 12, U 16.
    # unused T1 adds 4 to U. AJI = (8 + 8 + 12) / (16 + 16 + 16 + 4) = 28/52 = 7/13
    assert aji(pred, gt) == pytest.approx(7 / 13)
    # a pure split: G rows 2-5 cols 2-5 (16) predicted as two halves of 8: I 8, U 16 + unused 8 -> 1/3
    g = box((10, 10), (2, 5), (2, 5))
    s = box((10, 10), (2, 5), (2, 3), 1)
    box(None, (2, 5), (4, 5), 2, out=s)
    assert aji(s, g) == pytest.approx(1 / 3)
    assert paper_binary_aji(s, g) == 1.0  # binarised: the split is invisible
    empty = np.zeros((10, 10), int)
    assert aji(empty, empty) == 1.0 and aji(empty, g) == 0.0 and aji(g, empty) == 0.0
    assert aji(gt, gt) == 1.0


def test_panoptic_quality_perfect_and_half_matched():
    g = box((10, 10), (0, 3), (0, 3), 1)
    box(None, (6, 9), (6, 9), 2, out=g)
    perfect = np.where(g == 1, 9, np.where(g == 2, 5, 0))  # same objects, other ids
    assert panoptic_quality(perfect, g) == {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 2, "fp": 0, "fn": 0}
    # P1 rows 0-2 cols 0-3: IoU 12/16 = 0.75 (match); P2 rows 6-9 col 6: IoU 4/16 (no match)
    p = box((10, 10), (0, 2), (0, 3), 1)
    box(None, (6, 9), (6, 6), 2, out=p)
    r = panoptic_quality(p, g)
    # TP 1, FP 1, FN 1: DQ = 1 / (1 + 0.5 + 0.5) = 0.5, SQ = 0.75, PQ = 0.375
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert r["dq"] == pytest.approx(0.5) and r["sq"] == pytest.approx(0.75) and r["pq"] == pytest.approx(0.375)
    empty = np.zeros((10, 10), int)
    assert panoptic_quality(empty, empty)["pq"] == 1.0
    assert panoptic_quality(empty, g) == {"pq": 0.0, "dq": 0.0, "sq": 0.0, "tp": 0, "fp": 0, "fn": 2}
    with pytest.raises(ValueError):
        panoptic_quality(p, g, match_iou=0.3)


def test_panoptic_quality_split_merge_and_monai_backend_agree():
    pred, gt = split_and_merge()
    # only G3-T2 matches (IoU 0.75); M (IoU 0.5 with G1 and G2) and T1 are FP; G1, G2 are FN
    # DQ = 1 / (1 + 1 + 1) = 1/3, SQ = 0.75, PQ = 0.25
    r = panoptic_quality(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 2)
    assert r["pq"] == pytest.approx(0.25) and r["dq"] == pytest.approx(1 / 3) and r["sq"] == pytest.approx(0.75)
    rng = np.random.default_rng(1)
    cases = [split_and_merge(), touching_nuclei()]
    for _ in range(3):
        a = instances_from_binary(rng.random((16, 16)) > 0.55, connectivity=1)
        b = instances_from_binary(rng.random((16, 16)) > 0.55, connectivity=1)
        cases.append((a, b))
    for p, g in cases:
        ours, ref = panoptic_quality(p, g), panoptic_quality(p, g, backend="monai")
        assert (ours["tp"], ours["fp"], ours["fn"]) == (ref["tp"], ref["fp"], ref["fn"])
        assert ours["pq"] == pytest.approx(ref["pq"], abs=1e-6)


# --------------------------------------------------------------------------------- evaluate_case


def test_evaluate_case_glas():
    pred, gt = merged_glands()
    r = evaluate_case(pred, gt, "glas")
    assert tuple(r) == GLAS_KEYS
    # fg: pred 30, gt 24, overlap 20 -> Dice 40/54 = 20/27, IoU 20/34 = 10/17
    assert r["paper_dice"] == pytest.approx(20 / 27)
    assert r["paper_iou"] == pytest.approx(10 / 17)
    assert r["object_dice"] == pytest.approx(662 / 1311)
    # H(G1, S) = |(2,9)-(1,3)| = sqrt(37); H(G2, S) = 6 ((0,0) to (0,6)); S's partner is G2.
    # 0.5 * [(1/3) sqrt(37) + (2/3) 6 + 6] = 5 + sqrt(37) / 6
    assert r["object_hausdorff"] == pytest.approx(5 + math.sqrt(37) / 6)


def test_evaluate_case_monuseg():
    pred, gt = touching_nuclei()
    r = evaluate_case(torch.as_tensor(pred), torch.as_tensor(gt), "MoNuSeg")
    assert tuple(r) == MONUSEG_KEYS
    assert r == {"paper_dice": 1.0, "paper_aji_binary": 1.0, "aji": 0.5, "pq": 0.0, "dq": 0.0, "sq": 0.0}
    # with the true instances given, everything is perfect
    r = evaluate_case(pred, gt, "monuseg", pred_instances=gt)
    assert r["aji"] == 1.0 and r["pq"] == 1.0
    with pytest.raises(ValueError):
        evaluate_case(pred, gt, "ffhq")


# --------------------------------------------------------------------------------- MetricTable


def make_table(**kwargs) -> MetricTable:
    t = MetricTable(**kwargs)
    t.add("a", {"paper_dice": 0.8, "aji": 0.5}, run=0)
    t.add("b", paper_dice=0.6, aji=float("nan"), run=0)  # NaN: undefined, skipped in statistics
    t.add("a", {"paper_dice": 0.9, "aji": 0.7}, run=1)
    t.add_row({"name": "b", "run": 1, "paper_dice": 0.7, "aji": 0.5})
    return t


def test_metric_table_statistics_and_format():
    t = make_table()
    assert t.runs == ["0", "1"] and t.metric_names == ["paper_dice", "aji"] and len(t) == 4
    pr = t.per_run()
    # run 0: (0.8, 0.6) -> mean 0.7, std 0.1; run 1: (0.9, 0.7) -> mean 0.8, std 0.1
    assert pr["0"]["paper_dice"]["mean"] == pytest.approx(0.7) and pr["0"]["paper_dice"]["std"] == pytest.approx(0.1)
    assert pr["1"]["paper_dice"]["mean"] == pytest.approx(0.8)
    assert pr["0"]["aji"] == {"mean": 0.5, "std": 0.0, "n": 1}
    s = t.summary()
    # over runs: mean(0.7, 0.8) = 0.75, std (ddof 0) = 0.05
    assert s["paper_dice"]["mean"] == pytest.approx(0.75) and s["paper_dice"]["std"] == pytest.approx(0.05)
    assert (s["paper_dice"]["n_runs"], s["paper_dice"]["n_images"]) == (2, 4)
    # aji: run means 0.5 and 0.6 -> 0.55 +- 0.05, 3 defined images
    assert s["aji"]["mean"] == pytest.approx(0.55) and s["aji"]["n_images"] == 3
    assert make_table(ddof=1).summary()["paper_dice"]["std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    text = t.format(scale=100, digits=2)
    assert "paper_dice" in text and "75.00" in text and "5.00" in text
    # no run column: one run, std over runs 0
    single = MetricTable(run_key="seed")
    single.add("x", dice=1.0)
    single.add("y", dice=0.5)
    assert single.runs == [""] and single.summary()["dice"] == {"mean": 0.75, "std": 0.0, "n_runs": 1, "n_images": 2}


def test_metric_table_csv_json_round_trip(tmp_path):
    t = make_table()
    csv_path = t.write_csv(tmp_path / "out" / "metrics.csv")
    json_path = t.write_json(tmp_path / "out" / "metrics.json", extra={"labelled": 8})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "metrics.json"]  # no temp left
    header = csv_path.read_text().splitlines()[0]
    assert header == "name,run,paper_dice,aji"
    doc = json.loads(json_path.read_text())  # valid JSON: the NaN became null
    assert doc["rows"][1]["aji"] is None and doc["extra"] == {"labelled": 8}
    assert doc["summary"]["paper_dice"]["mean"] == pytest.approx(0.75)
    for back in (MetricTable.from_csv(csv_path), MetricTable.from_json(json_path)):
        assert back.summary() == t.summary()
        assert len(back.rows) == len(t.rows)
        for r1, r2 in zip(back.rows, t.rows):
            assert r1.keys() == r2.keys()
            for k in r1:
                assert r1[k] == r2[k] or (isinstance(r1[k], float) and math.isnan(r1[k]) and math.isnan(r2[k]))
    # rewriting replaces the file in place
    t.add("c", paper_dice=0.0, run=2)
    t.to_csv(csv_path)  # alias of write_csv
    assert len(MetricTable.from_csv(csv_path)) == 5
