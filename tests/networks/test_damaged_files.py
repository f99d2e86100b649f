"""A damaged weight file (empty, truncated, a saved web page, a Git LFS pointer) is named, with what is wrong."""

from __future__ import annotations

import pytest
import torch

from monai_mdm.convert import main as convert_main
from monai_mdm.inferers import MDMSegmenter, load_segmentation_model
from monai_mdm.networks import MDMUNet, load_pretrained, load_pretrained_unet
from monai_mdm.utils import load_torch_file

DAMAGE = {
    "empty": (lambda good: b"", "is empty"),
    "truncated": (lambda good: good[: len(good) // 2], "truncated or damaged"),
    "html": (lambda good: b"<!DOCTYPE html><html><body>Sign in</body></html>\n", "web page"),
    "lfs": (lambda good: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "git lfs pull"),
    "text": (lambda good: b"not a checkpoint at all\n", "is not a PyTorch file"),
}


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "model.pt"
    torch.save({"state_dict": MDMUNet.from_preset("tiny").state_dict()}, path)
    return path.read_bytes()


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, tmp_path, good_bytes):
    make, expected = DAMAGE[request.param]
    path = tmp_path / "weights.pt"
    path.write_bytes(make(good_bytes))
    return path, expected


@pytest.mark.parametrize(
    "load",
    [
        lambda p: load_pretrained(p, "tiny"),
        lambda p: load_pretrained_unet(p, "tiny"),
        lambda p: load_segmentation_model(p),
        lambda p: MDMSegmenter.load(p),
        lambda p: load_torch_file(p, "checkpoint", "Fix: delete it."),
    ],
    ids=["load_pretrained", "load_pretrained_unet", "load_segmentation_model", "MDMSegmenter.load", "checkpoint"],
)
def test_every_loader_names_the_file_and_the_damage(damaged, load):
    path, expected = damaged
    with pytest.raises(ValueError) as err:
        load(path)
    message = str(err.value)
    print(message)
    assert str(path) in message and expected.lower() in message.lower()
    assert "Fix:" in message


def test_converter_gives_no_pickle_advice_for_a_text_file(damaged, tmp_path, capsys):
    path, expected = damaged
    out = tmp_path / "converted.pt"
    assert convert_main([str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    print(err)
    assert err.startswith("error: ") and str(path) in err and expected.lower() in err.lower()
    assert "--trust-pickle" not in err
    assert not out.exists()


def test_a_sound_file_still_loads(tmp_path, good_bytes):
    path = tmp_path / "model.pt"
    path.write_bytes(good_bytes)
    assert set(load_torch_file(path, "weights", "Fix: none.", weights_only=True)) == {"state_dict"}
