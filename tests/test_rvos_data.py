"""Readers of the public RVOS layouts, on tiny datasets written on the fly."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from virst.data.rvos import decode_rle, encode_rle, open_dataset
from virst.errors import InputError

H, W = 12, 16


def _mask(t, k):
    m = np.zeros((H, W), bool)
    m[t : t + 3, k : k + 4] = True
    return m


def _frames(folder, video, names):
    (folder / video).mkdir(parents=True)
    for n in names:
        Image.fromarray(np.full((H, W, 3), 100, np.uint8)).save(folder / video / f"{n}.jpg")


def test_rle_round_trip_and_empty():
    m = _mask(2, 3)
    assert np.array_equal(decode_rle(encode_rle(m), (H, W)), m)
    assert encode_rle(np.zeros((H, W), bool)) is None
    assert not decode_rle(None, (H, W)).any()


def test_mevis_layout_unions_objects(tmp_path):
    names = ["00000", "00001", "00002"]
    _frames(tmp_path / "JPEGImages", "vidA", names)
    meta = {"videos": {"vidA": {"vid_id": 0, "frames": names, "expressions": {
        "0": {"exp": "two boxes", "obj_id": [0, 1], "anno_id": [7, 8]},
        "1": {"exp": "the left box", "obj_id": [0], "anno_id": [7]}}}}}
    masks = {"7": [encode_rle(_mask(0, 0)), None, encode_rle(_mask(1, 0))],
             "8": [encode_rle(_mask(5, 8)), encode_rle(_mask(5, 8)), None]}
    (tmp_path / "meta_expressions.json").write_text(json.dumps(meta))
    (tmp_path / "mask_dict.json").write_text(json.dumps(masks))
    ds = open_dataset("mevis", tmp_path)
    assert [e.text for e in ds.expressions] == ["two boxes", "the left box"]
    gt = ds.ground_truth(ds.expressions[0])
    assert gt.shape == (3, H, W)
    assert np.array_equal(gt[0], _mask(0, 0) | _mask(5, 8))
    assert np.array_equal(gt[1], _mask(5, 8))
    assert ds.foreground(ds.expressions[0]) is None
    assert ds.load_video(ds.expressions[0]).frames.shape == (3, H, W, 3)


def test_revos_layout_with_types_and_foreground(tmp_path):
    names = ["1", "2"]
    _frames(tmp_path / "JPEGImages", "MOSE/abc", names)
    meta = {"videos": {"MOSE/abc": {"vid_id": 0, "frames": names, "expressions": {
        "0": {"exp": "a", "obj_id": [0], "anno_id": [1], "type_id": 0},
        "1": {"exp": "b?", "obj_id": [0], "anno_id": [1], "type_id": 1}}}}}
    (tmp_path / "meta_expressions_valid_.json").write_text(json.dumps(meta))
    (tmp_path / "mask_dict.json").write_text(json.dumps({"1": [encode_rle(_mask(0, 0)), None]}))
    fg = {"MOSE/abc": {"masks_rle": [encode_rle(_mask(0, 0) | _mask(6, 6)), None]}}
    (tmp_path / "mask_dict_foreground.json").write_text(json.dumps(fg))
    ds = open_dataset("revos", tmp_path, "valid")
    assert [e.type_id for e in ds.expressions] == [0, 1]
    assert ds.foreground(ds.expressions[1])[0].sum() == 24
    assert ds.expressions[0].key == "MOSE/abc/0"


@pytest.mark.parametrize("name", ["davis17", "refytvos"])
def test_youtube_style_layouts_number_anno_ids_in_order(tmp_path, name):
    names = ["00000", "00005"]
    meta = {"videos": {
        "zeta": {"frames": names, "expressions": {"1": {"exp": "z1"}, "0": {"exp": "z0"}}},
        "alpha": {"frames": names, "expressions": {"0": {"exp": "a0"}}},
        "gamma": {"frames": names, "expressions": {"0": {"exp": "g0"}}}}}
    (tmp_path / "meta_expressions" / "valid").mkdir(parents=True)
    (tmp_path / "meta_expressions" / "valid" / "meta_expressions.json").write_text(json.dumps(meta))
    if name == "refytvos":  # the valid file also lists test videos; they are left out
        (tmp_path / "meta_expressions" / "test").mkdir()
        test = {"videos": {"gamma": meta["videos"]["gamma"]}}
        (tmp_path / "meta_expressions" / "test" / "meta_expressions.json").write_text(
            json.dumps(test))
    for v in meta["videos"]:
        _frames(tmp_path / "valid" / "JPEGImages", v, names)
    masks = {str(i): [encode_rle(_mask(i, i)), None] for i in range(4)}
    with open(tmp_path / "valid" / "mask_dict.pkl", "wb") as f:
        pickle.dump(masks, f)
    ds = open_dataset(name, tmp_path)
    texts = [e.text for e in ds.expressions]
    if name == "davis17":  # sorted videos, sorted expression ids
        assert texts == ["a0", "g0", "z0", "z1"]
    else:  # sorted videos, expression ids in file order, test videos removed
        assert texts == ["a0", "z1", "z0"]
    assert [e.anno_ids for e in ds.expressions] == [(str(i),) for i in range(len(texts))]
    last = ds.expressions[-1]
    assert np.array_equal(ds.ground_truth(last)[0], _mask(len(texts) - 1, len(texts) - 1))


def test_bad_roots_and_files(tmp_path):
    with pytest.raises(InputError, match="unknown dataset"):
        open_dataset("kinetics", tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        open_dataset("mevis", tmp_path / "nowhere")
    with pytest.raises(InputError, match="dataset file missing"):
        open_dataset("mevis", tmp_path)
    (tmp_path / "meta_expressions.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        open_dataset("mevis", tmp_path)
