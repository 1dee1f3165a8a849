"""The torch-free post-processing of the CRF pool's workers: the numpy resize and softmax equal
torch's, and neither the module nor its jobs (nor the pool's worker initialiser) import torch."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seco_cli import pool
from seco_cli.postprocess import MaskSettings, pseudo_job, resize_scores, segment_job, softmax

REPO = Path(__file__).resolve().parents[1]
CRF = {"iterations": 2, "bilateral_sxy": 20.0, "bilateral_srgb": 10.0}


def _torch_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(x)[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize(("shape", "size"), [
    ((3, 8, 10), (16, 20)),      # ×2 up
    ((2, 7, 9), (37, 23)),       # non-integer ratios, up in one axis, down in the other
    ((4, 56, 56), (375, 500)),   # a store's CAMs to a VOC image
    ((2, 40, 32), (20, 8)),      # ×1/2 and ×1/4 down: bilinear sampling, not area averaging
    ((3, 33, 47), (10, 13)),     # non-integer down
    ((2, 9, 11), (9, 11)),       # identity
    ((2, 1, 1), (5, 7)),         # a 1-pixel input
    ((1, 1, 6), (4, 3)),         # a 1-row input
    ((2, 6, 5), (1, 1)),         # to one pixel
    ((5, 12, 1), (1, 9)),        # a 1-column input to a row
])
def test_resize_scores_equals_torch_bilinear(shape, size):
    rng = np.random.default_rng(sum(shape) + sum(size))
    for x in (rng.random(shape, dtype=np.float32),
              (rng.standard_normal(shape) * 4).astype(np.float32)):
        got = resize_scores(x, size)
        assert got.shape == (shape[0], *size) and got.dtype == np.float32
        np.testing.assert_allclose(got, _torch_resize(x, size), rtol=0, atol=1e-5)
    # float16 (how CAMs are stored) is read as float32, and the input is never modified
    x16 = rng.random(shape).astype(np.float16)
    before = x16.copy()
    np.testing.assert_allclose(resize_scores(x16, size),
                               _torch_resize(x16.astype(np.float32), size), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(x16, before)


def test_resize_to_the_same_size_is_a_float32_copy():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    out = resize_scores(x, (3, 4))
    np.testing.assert_array_equal(out, x)
    assert out is not x and not np.shares_memory(out, x)


def test_softmax_equals_torch():
    x = (np.random.default_rng(0).standard_normal((6, 9, 11)) * 20).astype(np.float32)
    np.testing.assert_allclose(softmax(x, 0), torch.from_numpy(x).softmax(0).numpy(),
                               rtol=0, atol=1e-6)


_NO_TORCH = """
import os, pickle, sys
assert 'torch' not in sys.modules, 'importing {module} imported torch'
from seco_cli import pool
pool._init_worker()
assert 'torch' not in sys.modules, 'pool._init_worker imported torch'
assert all(os.environ[v] == '1' for v in pool._THREAD_VARS)
for fn, job in pickle.loads(sys.stdin.buffer.read()):
    image_id, labels = fn(job)
    assert labels.dtype.name == 'uint8' and labels.shape == job[1].shape[:2], labels.shape
    assert 'torch' not in sys.modules, f'{{fn.func.__name__}} imported torch'
print('ok')
"""


@pytest.mark.parametrize("module", ["seco_cli.postprocess", "seco_cli.pool"])
def test_pool_workers_never_import_torch(module):
    """A fresh interpreter imports the module, runs the pool's initialiser and one pseudo and
    one segment job with the CRF on (unpickled, as a spawn worker gets them): no torch."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    jobs = [(partial(pseudo_job, settings=MaskSettings(bkg=0.3, crf=CRF)),
             ("a", image, rng.random((2, 6, 8), dtype=np.float32), [3, 7])),
            (partial(segment_job, crf=CRF),
             ("b", image, rng.standard_normal((4, 6, 8)).astype(np.float32)))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONSTARTUP", None)
    done = subprocess.run([sys.executable, "-c", f"import {module}\n" + _NO_TORCH.format(
        module=module)], input=pickle.dumps(jobs), capture_output=True, cwd=REPO, env=env,
        timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == b"ok", done.stderr.decode()


def test_init_worker_sets_one_thread(monkeypatch):
    for var in pool._THREAD_VARS:
        monkeypatch.setenv(var, "4")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pool._init_worker()  # torch is imported here: it is set directly too
        assert torch.get_num_threads() == 1
        assert all(os.environ[v] == "1" for v in pool._THREAD_VARS)
    finally:
        torch.set_num_threads(threads)


def _image_and_logits(rng, k: int, h: int = 20, w: int = 24):
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return image, rng.standard_normal((k, h // 2, w // 2)).astype(np.float32)


def test_crf_over_present_labels_keeps_to_them():
    """`segment.crf_labels: present`: the CRF runs over the labels that win a pixel before it,
    so nothing else can come out; the labels out are those labels' own ids."""
    from seco_cli.postprocess import segment_labels

    rng = np.random.default_rng(3)
    image, logits = _image_and_logits(rng, 6)
    logits[[1, 4]] -= 20.0  # labels 1 and 4 win nowhere
    before = resize_scores(logits, image.shape[:2]).argmax(0)
    present = set(np.unique(before).tolist())
    assert present.isdisjoint({1, 4}) and len(present) >= 2
    out = segment_labels(image, logits, CRF, "present")
    assert out.dtype == np.uint8 and out.shape == image.shape[:2]
    assert set(np.unique(out).tolist()) <= present


def test_crf_over_present_labels_equals_all_when_the_others_are_negligible():
    from seco_cli.postprocess import segment_labels

    rng = np.random.default_rng(4)
    image, logits = _image_and_logits(rng, 5)
    logits[2:] -= 40.0  # labels 2-4: probability ≈ 0 everywhere (clipped at 1e-5 in the unary)
    np.testing.assert_array_equal(segment_labels(image, logits, CRF, "present"),
                                  segment_labels(image, logits, CRF, "all"))


def test_crf_over_one_present_label_is_that_label_everywhere():
    from seco_cli.postprocess import segment_labels

    rng = np.random.default_rng(5)
    image, logits = _image_and_logits(rng, 4)
    logits[3] += 50.0
    out = segment_labels(image, logits, CRF, "present")
    assert (out == 3).all()
    np.testing.assert_array_equal(out, segment_labels(image, logits, CRF, "all"))


def test_segment_job_passes_the_crf_labels(monkeypatch):
    import seco_cli.postprocess as pp

    seen = []
    monkeypatch.setattr(pp, "segment_labels", lambda *a: seen.append(a[3]) or np.zeros((1, 1)))
    rng = np.random.default_rng(6)
    image, logits = _image_and_logits(rng, 3)
    pp.segment_job(("a", image, logits), CRF, "present")
    pp.segment_job(("b", image, logits), CRF)
    assert seen == ["present", "all"]
