"""Artifact store: round trip, completion marker, refusal of incomplete or foreign stores."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from seco_cli.errors import MissingInputError, SecoError
from seco_cli.store import COMPLETE, StoreReader, StoreWriter, WriteBehind


def _entry(store: Path, key: str) -> bytes:
    """One key's bytes, from whichever bundle of the store holds it."""
    for bundle in store.glob("bundle-*.zip"):
        with zipfile.ZipFile(bundle) as zf:
            if key in zf.namelist():
                return zf.read(key)
    raise KeyError(key)


def test_round_trip_float16_and_uint8(tmp_path: Path):
    w = StoreWriter(tmp_path / "s.zarr", "cams", {"seed": 3, "params": {"a": 1}})
    cam = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    w.write("img_a", cam, {"labels": [1, 4]})
    w.write("img_b", np.arange(12, dtype=np.uint8).reshape(3, 4))
    w.write("img_c", np.zeros((0, 5, 7), np.float32), {"labels": []})
    w.finish()
    r = StoreReader(tmp_path / "s.zarr", "cams")
    assert r.ids() == ["img_a", "img_b", "img_c"]
    got, attrs = r.read_with_attrs("img_a")
    assert got.dtype == np.float16 and attrs == {"labels": [1, 4]}
    np.testing.assert_allclose(got, cam, atol=1e-3)
    np.testing.assert_array_equal(r.read("img_b"), np.arange(12).reshape(3, 4))
    assert r.read("img_c").shape == (0, 5, 7)
    assert r.attrs["seed"] == 3 and r.attrs["params"] == {"a": 1}


def test_uint8_cams_round_trip_within_half_a_level(tmp_path: Path):
    rng = np.random.default_rng(1)
    cam = rng.random((3, 40, 50)).astype(np.float32)
    cam[0, 0, :4] = [0.0, 1.0, -0.2, 1.3]  # the ends, and values outside [0, 1] are clipped
    w = StoreWriter(tmp_path / "s.zarr", "cams", {})
    w.write("a", cam, {"labels": [2, 3, 5]}, dtype="uint8")
    w.write("empty", np.zeros((0, 4, 4), np.float32), {"labels": []}, dtype="uint8")
    w.finish()
    assert _entry(tmp_path / "s.zarr", "a/zarr.json").decode().count('"uint8"') == 1
    r = StoreReader(tmp_path / "s.zarr", "cams")
    got, attrs = r.read_with_attrs("a")
    assert got.dtype == np.float32 and attrs == {"labels": [2, 3, 5]}  # divide_by is internal
    np.testing.assert_array_equal(got, r.read("a"))
    assert np.abs(got - np.clip(cam, 0, 1)).max() <= 1 / 510 + 1e-7
    assert got[0, 0, :4].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert np.array_equal(got * 255, np.rint(got * 255))  # exactly the levels q / 255
    assert r.read("empty").shape == (0, 4, 4) and r.read("empty").dtype == np.float32


def test_uint8_store_is_smaller_than_float16_on_the_same_cams(tmp_path: Path):
    # smooth CAM-like maps (blobs), the case compression meets in practice
    yy, xx = np.mgrid[0:96, 0:128] / 96.0
    cam = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) * 8)
                    for cy, cx in [(0.3, 0.4), (0.7, 1.0)]]).astype(np.float32)
    size = {}
    for dtype in ("float16", "uint8"):
        w = StoreWriter(tmp_path / f"{dtype}.zarr", "cams", {})
        w.write("a", cam, {"labels": [1, 2]}, dtype=dtype)
        w.finish()
        size[dtype] = len(_entry(tmp_path / f"{dtype}.zarr", "a/c/0/0/0"))
    assert size["uint8"] < size["float16"]


def test_unknown_float_dtype_is_refused(tmp_path: Path):
    w = StoreWriter(tmp_path / "s.zarr", "cams", {})
    with pytest.raises(ValueError, match="uint8"):
        w.write("a", np.zeros((1, 2, 2), np.float32), dtype="float32")


def test_a_store_is_a_few_bundle_files_and_no_folders(tmp_path: Path):
    w = StoreWriter(tmp_path / "s.zarr", "masks", {}, per_bundle=8)
    for i in range(10):
        w.write(f"im{i}", np.ones((16, 16), np.uint8))
        w.write(f"cam{i}", np.ones((2, 16, 16), np.float32))
    w.finish()
    files = sorted(p.name for p in (tmp_path / "s.zarr").rglob("*") if p.is_file())
    # 20 arrays in bundles of 8; the group's zarr.json, COMPLETE and the shard's marker
    assert files == [".shard-0-of-1.done", "COMPLETE", "bundle-0-of-1-00000.zip",
                     "bundle-0-of-1-00001.zip", "bundle-0-of-1-00002.zip", "zarr.json"]
    assert not [p for p in (tmp_path / "s.zarr").rglob("*") if p.is_dir()]  # DVC walks none
    # each bundle is a Zarr group of its own, readable with zarr alone
    last = zarr.open_group(zarr.storage.ZipStore(tmp_path / "s.zarr" / files[4], mode="r"), mode="r")
    assert sorted(last.array_keys()) == ["cam8", "cam9", "im8", "im9"]
    np.testing.assert_array_equal(last["im9"][...], np.ones((16, 16), np.uint8))
    r = StoreReader(tmp_path / "s.zarr", "masks")
    assert len(r.ids()) == 20 and r.read("cam3").shape == (2, 16, 16)


def test_the_same_arrays_make_the_same_bytes(tmp_path: Path):
    """A stage that re-runs with the same result leaves identical files: DVC then skips the
    stages after it (zip entries carry a fixed time stamp)."""
    def digest(path: Path) -> dict[str, str]:
        rng = np.random.default_rng(4)
        w = StoreWriter(path, "cams", {"seed": 1}, groups=["aux"], per_bundle=3)
        for i in range(5):
            w.write(f"im{i}", rng.random((2, 9, 7)).astype(np.float32), {"labels": [0, i]},
                    dtype="uint8")
            w.write(f"im{i}", rng.random((2, 9, 7)).astype(np.float32), group="aux")
        w.finish()
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                for p in sorted(path.glob("*.zip")) + [path / "zarr.json"]}

    first = digest(tmp_path / "a.zarr")
    time.sleep(1.1)  # a zip time stamp has 2 s resolution; a later second must not matter
    assert digest(tmp_path / "b.zarr") == first and len(first) == 5


def test_sub_groups_are_kept_apart_in_the_bundles(tmp_path: Path):
    w = StoreWriter(tmp_path / "s.zarr", "segment", {}, groups=["raw", "ms_crf"], per_bundle=3)
    for i in range(4):
        w.write(f"im{i}", np.full((5, 6), i, np.uint8), group="raw")
        w.write(f"im{i}", np.full((5, 6), 10 + i, np.uint8), group="ms_crf")
    with pytest.raises(ValueError, match="already in store"):
        w.write("im0", np.zeros((5, 6), np.uint8), group="raw")
    with pytest.raises(ValueError, match="name of a group"):
        w.write("raw", np.zeros((5, 6), np.uint8))
    with pytest.raises(ValueError, match="no group 'aux'"):
        w.write("im0", np.zeros((5, 6), np.uint8), group="aux")
    w.finish()
    r = StoreReader(tmp_path / "s.zarr", "segment")
    assert r.ids() == [] and r.ids("raw") == r.ids("ms_crf") == ["im0", "im1", "im2", "im3"]
    assert int(r.read("im2", "raw")[0, 0]) == 2 and int(r.read("im2", "ms_crf")[0, 0]) == 12
    assert r.has("im1", "raw") and not r.has("im1") and not r.has("im9", "raw")
    raw, n = r.stored_bytes("raw")
    whole = sum(p.stat().st_size for p in (tmp_path / "s.zarr").glob("*.zip"))
    assert n == 4 and 0 < raw and 2 * raw < whole + 100  # about half the bundles' bytes
    with pytest.raises(MissingInputError, match="no group 'aux'"):
        r.ids("aux")


def test_a_store_of_the_folder_layout_still_reads(tmp_path: Path):
    """Stores written before the bundles (one Zarr array folder per image, '.' chunk keys)."""
    path = tmp_path / "old.zarr"
    root = zarr.open_group(path, mode="w")
    root.create_group("aux")
    root.attrs.update({"seco_store": "cams", "num_shards": 1, "groups": ["aux"], "seed": 5})
    keys = {"name": "default", "separator": "."}
    for parent, name, value in [(root, "a", 128), (root, "b", 64), (root["aux"], "a", 255)]:
        arr = parent.create_array(name, shape=(1, 3, 4), dtype="uint8", chunks=(1, 3, 4),
                                  fill_value=0, chunk_key_encoding=keys)
        arr[...] = np.full((1, 3, 4), value, np.uint8)
        arr.attrs.update({"divide_by": 255, "labels": [2]})
    (path / ".shard-0-of-1.done").write_text("{}")
    (path / COMPLETE).write_text(json.dumps({"kind": "cams", "shards": 1}))
    r = StoreReader(path, "cams")
    assert not r.bundled and r.ids() == ["a", "b"] and r.ids("aux") == ["a"]
    got, attrs = r.read_with_attrs("b")
    assert attrs == {"labels": [2]} and float(got.max()) == pytest.approx(64 / 255)
    assert float(r.read("a", "aux").min()) == 1.0
    assert r.stored_bytes()[1] == 2 and r.stored_bytes()[0] > 0


def test_interrupted_store_is_refused(tmp_path: Path):
    w = StoreWriter(tmp_path / "s.zarr", "cams", {})
    w.write("a", np.zeros((1, 2, 2)))  # no finish(): as if the stage was killed here
    with pytest.raises(MissingInputError, match="incomplete"):
        StoreReader(tmp_path / "s.zarr", "cams", stage_hint="cams")


def test_rewrite_clears_marker_until_finished(tmp_path: Path):
    path = tmp_path / "s.zarr"
    w = StoreWriter(path, "cams", {})
    w.write("a", np.zeros((1, 2, 2)))
    w.finish()
    assert (path / COMPLETE).exists()
    w2 = StoreWriter(path, "cams", {})
    assert not (path / COMPLETE).exists()
    w2.write("b", np.zeros((1, 2, 2)))
    w2.finish()
    assert StoreReader(path).ids() == ["b"]


def test_sharded_store_completes_after_every_shard(tmp_path: Path):
    path = tmp_path / "s.zarr"
    w0 = StoreWriter(path, "cams", {}, shard=0, num_shards=2)
    w1 = StoreWriter(path, "cams", {}, shard=1, num_shards=2, create=False)
    w0.write("a", np.zeros((1, 2, 2)))
    w0.finish()
    assert not (path / COMPLETE).exists()
    w1.write("b", np.ones((1, 2, 2)))
    w1.finish()
    assert StoreReader(path).ids() == ["a", "b"]


def test_a_shard_that_joins_again_replaces_its_own_bundles_only(tmp_path: Path):
    path = tmp_path / "s.zarr"
    w0 = StoreWriter(path, "cams", {}, shard=0, num_shards=2)
    w0.write("a", np.zeros((1, 2, 2)))
    w0.finish()
    w1 = StoreWriter(path, "cams", {}, shard=1, num_shards=2, create=False)
    w1.write("b", np.ones((1, 2, 2)))  # shard 1 is killed here: no finish
    again = StoreWriter(path, "cams", {}, shard=1, num_shards=2, create=False)
    again.write("c", np.ones((1, 2, 2)))
    assert again.finish() is True
    r = StoreReader(path)
    assert r.ids() == ["a", "c"] and float(r.read("c").min()) == 1.0


def test_missing_store_names_stage(tmp_path: Path):
    with pytest.raises(MissingInputError, match="run `seco pseudo` first"):
        StoreReader(tmp_path / "none.zarr", stage_hint="pseudo")


def test_wrong_kind_is_refused(tmp_path: Path):
    w = StoreWriter(tmp_path / "s.zarr", "masks", {})
    w.finish()
    with pytest.raises(MissingInputError, match="expected 'cams'"):
        StoreReader(tmp_path / "s.zarr", "cams")


def test_user_folder_is_never_overwritten(tmp_path: Path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(SecoError, match="refusing to overwrite"):
        StoreWriter(mine, "cams", {})
    assert (mine / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("bad", ["../x", "a/b", ".."])
def test_ids_cannot_escape(tmp_path: Path, bad: str):
    w = StoreWriter(tmp_path / "s.zarr", "cams", {})
    with pytest.raises(SecoError):
        w.write(bad, np.zeros((1, 1)))


def test_fresh_output_dir_replaces_ours_refuses_users(tmp_path: Path):
    from seco_cli.store import fresh_output_dir

    out = fresh_output_dir(tmp_path / "png")
    (out / "a.png").write_bytes(b"x")
    fresh_output_dir(out)  # a re-run replaces our own folder
    assert not (out / "a.png").exists()
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.png").write_bytes(b"mine")
    with pytest.raises(SecoError, match="refusing to overwrite"):
        fresh_output_dir(user)
    assert (user / "keep.png").read_bytes() == b"mine"


def test_write_behind_stores_every_image_in_the_background(tmp_path: Path):
    rng = np.random.default_rng(1)
    cams = {f"img_{i:02d}": rng.random((2, 6, 5)).astype(np.float32) for i in range(20)}
    with WriteBehind(StoreWriter(tmp_path / "s.zarr", "cams", {}), depth=3) as w:
        for image_id, cam in cams.items():
            w.write(image_id, cam, {"labels": [1, 2]}, dtype="uint8")
        assert w.finish() is True
    r = StoreReader(tmp_path / "s.zarr", "cams")
    assert r.ids() == sorted(cams)
    for image_id, cam in cams.items():
        np.testing.assert_allclose(r.read(image_id), cam, atol=1 / 510 + 1e-6)


def test_write_behind_failure_is_raised_and_leaves_the_store_incomplete(tmp_path: Path):
    path = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="float arrays are stored as one of"):
        with WriteBehind(StoreWriter(path, "cams", {})) as w:
            w.write("img_a", np.zeros((1, 4, 4), np.float32))
            w.write("img_b", np.zeros((1, 4, 4), np.float32), dtype="float64")  # refused
            w.write("img_c", np.zeros((1, 4, 4), np.float32))
            w.finish()  # raises the failed write's error before marking anything
    assert not (path / COMPLETE).exists()
    with pytest.raises(MissingInputError):
        StoreReader(path, "cams")


def test_a_reader_keeps_a_bounded_number_of_bundles_open(tmp_path: Path, monkeypatch):
    """A COCO-sized store has hundreds of bundles; reading them all must not hold a file
    handle each (a common limit is 1,024 per process)."""
    import seco_cli.store as store

    monkeypatch.setattr(store, "OPEN_BUNDLES", 3)
    w = StoreWriter(tmp_path / "s.zarr", "masks", {}, per_bundle=2)
    for i in range(20):
        w.write(f"im{i:02d}", np.full((4, 4), i, np.uint8))
    w.finish()
    def open_bundles() -> int:  # this process's file handles on the store's bundles
        fds = Path("/proc/self/fd")
        links = [os.readlink(f) for f in fds.iterdir() if f.is_symlink()] if fds.is_dir() else []
        return sum(link.endswith(".zip") and "s.zarr" in link for link in links)

    r = StoreReader(tmp_path / "s.zarr", "masks")
    for _ in range(2):  # twice over: evicted bundles reopen
        for i, image_id in enumerate(r.ids()):
            assert int(r.read(image_id)[0, 0]) == i
            assert len(r._open) <= 3 and open_bundles() <= 3
    assert len(r._open) == 3
    r.close()
    assert not r._open and open_bundles() == 0 and int(r.read("im07").max()) == 7
