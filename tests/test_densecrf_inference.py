"""DenseCRF mean-field inference layer against brute-force numpy mean field.

The brute force uses dense kernel matrices: first the lattice's own (column q = the lattice's response
to the unit vector at q, so the mean-field algebra is checked exactly), then an exact Gaussian (so the
lattice approximation is checked to give mostly the same labelling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import LayerError
from rloss.lattice import Permutohedral
from rloss.layers.registry import layer_class
from rloss.proto import caffe_pb2

FLT_MIN = float(np.finfo(np.float32).tiny)
PARAMS = "max_iter: 5 pos_w: 3 pos_xy_std: 2 bi_w: 5 bi_xy_std: 6 bi_rgb_std: 10"
# (weight, sigma_xy, sigma_rgb or None) of the kernels in PARAMS
KERNELS = [(3.0, 2.0, None), (5.0, 6.0, 10.0)]


def make_layer(shapes, params: str = PARAMS, bottoms: str = 'bottom: "image"'):
    text = (f'name: "crf" type: "DenseCRF" bottom: "fc8" bottom: "data_dim" {bottoms} top: "q" '
            f"dense_crf_param {{ {params} }}")
    return layer_class("DenseCRF")(text_format.Parse(text, caffe_pb2.LayerParameter()), shapes, caffe_pb2.TEST)


def inputs(n: int, m: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy scores favouring one label per image quadrant, and a blocky mean-subtracted image."""
    rng = np.random.RandomState(seed)
    region = (np.arange(h)[:, None] * 2 // h) * 2 + (np.arange(w)[None, :] * 2 // w)
    scores = rng.randn(n, m, h, w).astype(np.float32) * 1.5
    scores += 1.0 * (np.arange(m)[None, :, None, None] == (region % m)[None, None])
    colours = rng.uniform(-100, 100, size=(n, 4, 3)).astype(np.float32)
    image = np.stack([colours[i][region].transpose(2, 0, 1) for i in range(n)])
    return scores, image + rng.randn(*image.shape).astype(np.float32) * 3


def features(h: int, w: int, sigma_xy: float, image: np.ndarray | None, sigma_rgb: float | None) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    columns = [xs / np.float32(sigma_xy), ys / np.float32(sigma_xy)]
    if sigma_rgb is not None:
        columns += [c / np.float32(sigma_rgb) for c in image]
    return np.stack(columns, axis=-1).reshape(h * w, -1)


def lattice_matrix(f: np.ndarray) -> np.ndarray:
    return Permutohedral(f).filter(np.eye(len(f), dtype=np.float32)).astype(np.float64)


def gaussian_matrix(f: np.ndarray) -> np.ndarray:
    f = f.astype(np.float64)
    return np.exp(-0.5 * ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def brute_force(scores: np.ndarray, image: np.ndarray, iterations: int, matrix=lattice_matrix) -> np.ndarray:
    """Q (M, H, W): Q = softmax(score); Q = softmax(score + sum_k w_k (A_k Q) / (A_k 1)) per iteration."""
    m, h, w = scores.shape
    kernels = []
    for weight, sigma_xy, sigma_rgb in KERNELS:
        a = matrix(features(h, w, sigma_xy, image, sigma_rgb))
        kernels.append((weight, a, 1.0 / (a.sum(axis=1, keepdims=True) + 1e-20)))
    unary = scores.reshape(m, -1).T.astype(np.float64)
    q = softmax(unary)
    for _ in range(iterations):
        q = softmax(unary + sum(weight * norm * (a @ q) for weight, a, norm in kernels))
    return q.T.reshape(m, h, w)


def run(layer, scores: np.ndarray, dims, image: np.ndarray | None) -> np.ndarray:
    data_dim = torch.tensor(dims, dtype=torch.float32).reshape(len(dims), 1, 1, 2)
    bottoms = [torch.from_numpy(scores), data_dim] + ([] if image is None else [torch.from_numpy(image)])
    (out,) = layer(*bottoms)
    assert not out.requires_grad
    return out.numpy()


def test_mean_field_matches_brute_force_with_the_lattice_matrices() -> None:
    scores, image = inputs(1, 3, 12, 10)
    out = run(make_layer([scores.shape, (1, 1, 1, 2), image.shape]), scores, [(12, 10)], image)
    expected = brute_force(scores[0], image[0], 5)
    assert np.abs(out[0] - expected).max() <= 2e-5
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_lattice_mean_field_labels_agree_with_exact_gaussian_mean_field() -> None:
    """The normaliser cancels the lattice's ~0.6 scale: labels mostly agree with exact Gaussians."""
    scores, image = inputs(1, 3, 16, 14, seed=3)
    out = run(make_layer([scores.shape, (1, 1, 1, 2), image.shape]), scores, [(16, 14)], image)
    exact = brute_force(scores[0], image[0], 5, matrix=gaussian_matrix)
    agreement = float((out[0].argmax(axis=0) == exact.argmax(axis=0)).mean())
    unary_only = float((scores[0].argmax(axis=0) == exact.argmax(axis=0)).mean())
    assert agreement >= 0.95 and agreement > unary_only


def test_data_dim_crops_each_image_and_images_are_indexed_per_item() -> None:
    scores, image = inputs(2, 3, 12, 10, seed=1)
    out = run(make_layer([scores.shape, (2, 1, 1, 2), image.shape]), scores, [(9, 7), (20, 10)], image)
    assert (out[0, :, 9:, :] == 0).all() and (out[0, :, :, 7:] == 0).all()
    assert np.abs(out[0, :, :9, :7] - brute_force(scores[0, :, :9, :7], image[0, :, :9, :7], 5)).max() <= 2e-5
    # a region larger than the scores is clipped to them; item 1 uses its own image
    assert np.abs(out[1] - brute_force(scores[1], image[1], 5)).max() <= 2e-5


def test_log_output_and_zero_iterations() -> None:
    scores, image = inputs(1, 3, 8, 9, seed=2)
    layer = make_layer([scores.shape, (1, 1, 1, 2), image.shape], params=PARAMS + " output_probability: false")
    out = run(layer, scores, [(6, 9)], image)
    expected = np.log(np.maximum(brute_force(scores[0, :, :6], image[0, :, :6], 5), FLT_MIN))
    assert np.abs(out[0, :, :6] - expected).max() <= 1e-4 and (out[0, :, 6:] == 0).all()
    still = make_layer([scores.shape, (1, 1, 1, 2)], params="max_iter: 0", bottoms="")
    q0 = run(still, scores, [(8, 9)], None)
    assert np.allclose(q0[0], softmax(scores[0].reshape(3, -1).T).T.reshape(3, 8, 9), atol=1e-6)


def test_no_gradient_even_if_scores_require_one() -> None:
    scores, image = inputs(1, 2, 5, 5)
    layer = make_layer([scores.shape, (1, 1, 1, 2), image.shape])
    (out,) = layer(torch.from_numpy(scores).requires_grad_(True), torch.tensor([5.0, 5.0]).reshape(1, 1, 1, 2),
                   torch.from_numpy(image))
    assert not out.requires_grad and out.shape == scores.shape


@pytest.mark.parametrize("params,bottoms,shapes,message", [
    ("pos_w: 3 pos_xy_std: 2 pos_xy_std: 4", 'bottom: "image"', None, "pos_w"),
    ("bi_w: 5 bi_xy_std: 50", 'bottom: "image"', None, "bi_rgb_std"),
    ("bi_w: 5 bi_xy_std: 50 bi_rgb_std: 3", "", [(1, 3, 6, 6), (1, 1, 1, 2)], "need the image"),
    ("pos_w: 3 pos_xy_std: 0", 'bottom: "image"', None, "pos_xy_std"),
    ("max_iter: -1", 'bottom: "image"', None, "max_iter"),
    (PARAMS, 'bottom: "image"', [(1, 3, 6, 6), (1, 1, 1, 3), (1, 3, 6, 6)], "data_dim"),
    (PARAMS, 'bottom: "image"', [(1, 3, 6, 6), (1, 1, 1, 2), (1, 3, 6, 5)], r"\(1, 3, 6, 5\)"),
])
def test_bad_configuration_is_a_layer_error(params, bottoms, shapes, message) -> None:
    shapes = shapes or [(1, 3, 6, 6), (1, 1, 1, 2), (1, 3, 6, 6)]
    with pytest.raises(LayerError, match=rf"'crf'.*DenseCRF.*{message}"):
        make_layer(shapes, params=params, bottoms=bottoms)


def test_bad_data_dim_and_nan_scores_are_layer_errors() -> None:
    scores, image = inputs(1, 3, 6, 6)
    layer = make_layer([scores.shape, (1, 1, 1, 2), image.shape])
    with pytest.raises(LayerError, match="data_dim"):
        run(layer, scores, [(0, 6)], image)
    scores[0, 0, 0, 0] = np.nan
    with pytest.raises(LayerError, match="NaN"):
        run(layer, scores, [(6, 6)], image)
