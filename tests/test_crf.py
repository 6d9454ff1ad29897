"""Dense CRF: the unary formula, and refinement of a noisy prediction on a sharp-edged image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pydensecrf.densecrf")

from depthg import crf  # noqa: E402


def _scene(size=48, seed=0):
    """Three flat-coloured regions with sharp edges, and their labels."""
    label = np.zeros((size, size), dtype=np.int64)
    label[:, size // 2:] = 1
    label[size // 3: 2 * size // 3, size // 4: 3 * size // 4] = 2
    colours = np.array([[30, 40, 200], [220, 200, 40], [40, 180, 60]], dtype=np.uint8)
    image = colours[label]
    rng = np.random.default_rng(seed)
    logits = 1.0 * np.eye(3)[label].transpose(2, 0, 1) + rng.normal(0, 1.0, size=(3, size, size))
    return image, label, torch.tensor(logits, dtype=torch.float32)


def test_unary_is_negative_log_softmax_of_upsampled_logits():
    logits = torch.randn(4, 5, 6)
    u = crf.unary(logits, (10, 12))
    up = torch.nn.functional.interpolate(logits[None], size=(10, 12), mode="bilinear", align_corners=False)[0]
    expect = -torch.log(torch.softmax(up, 0).clamp(min=1e-5))
    assert u.shape == (4, 120) and u.dtype == np.float32
    np.testing.assert_allclose(u, expect.reshape(4, -1).numpy(), rtol=1e-5, atol=1e-5)


def test_crf_improves_noisy_prediction_on_sharp_edges():
    image, label, logits = _scene()
    before = (logits.argmax(0).numpy() == label).mean()
    probs = crf.dense_crf(image, logits)
    after = (probs.argmax(0) == label).mean()
    assert probs.shape == (3, 48, 48)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert before < 0.85
    assert after > before + 0.1
    assert after > 0.95


def test_crf_batch_upsamples_low_resolution_logits():
    image, label, _ = _scene(size=32, seed=1)
    low = torch.tensor(np.eye(3)[label[::4, ::4]].transpose(2, 0, 1), dtype=torch.float32) * 3
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    probs = crf.crf_batch(images, low[None])
    assert probs.shape == (1, 3, 32, 32)
    assert (probs[0].argmax(0).numpy() == label).mean() > 0.95


def test_dense_crf_rejects_float_image():
    with pytest.raises(ValueError, match="uint8"):
        crf.dense_crf(np.zeros((4, 4, 3), np.float32), torch.zeros(2, 4, 4))
