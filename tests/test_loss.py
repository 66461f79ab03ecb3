"""Softmax cross-entropy against closed forms, at extreme logits, and finite differences."""

import math

import numpy as np
from gradcheck import numerical_grad, rel_error

from lenet_xp.functional.loss import softmax_cross_entropy


def test_uniform_logits_closed_form():
    logits, labels = np.zeros((4, 10)), np.array([0, 3, 9, 3])
    loss, grad = softmax_cross_entropy(logits, labels)
    assert math.isclose(float(loss), math.log(10), rel_tol=1e-12)
    expected = np.full((4, 10), 0.1)
    expected[np.arange(4), labels] -= 1
    np.testing.assert_allclose(grad, expected / 4, atol=1e-15)


def test_two_class_closed_form():
    # loss = log(1 + exp(b - a)) for label 0 with logits (a, b)
    a, b = 0.3, -1.2
    loss, _ = softmax_cross_entropy(np.array([[a, b]]), np.array([0]))
    assert math.isclose(float(loss), math.log1p(math.exp(b - a)), rel_tol=1e-12)


def test_extreme_logits_are_finite_and_correct():
    logits = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]])
    loss, grad = softmax_cross_entropy(logits, np.array([0, 1]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert math.isclose(float(loss), (0.0 + 2e4) / 2, rel_tol=1e-12)
    np.testing.assert_allclose(grad, [[0, 0, 0], [0.5, -0.5, 0]], atol=1e-12)
    loss32, _ = softmax_cross_entropy(logits.astype(np.float32), np.array([0, 1]))
    assert loss32.dtype == np.float32 and math.isclose(float(loss32), 1e4, rel_tol=1e-6)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((5, 7)) * 3, rng.integers(0, 7, 5)
    _, grad = softmax_cross_entropy(logits, labels)
    numeric = numerical_grad(lambda: float(softmax_cross_entropy(logits, labels)[0]), logits)
    assert rel_error(grad, numeric) <= 1e-6


def test_mean_over_batch_not_sum():
    logits, labels = np.random.default_rng(1).standard_normal((3, 4)), np.array([1, 2, 3])
    loss1, grad1 = softmax_cross_entropy(logits, labels)
    loss2, grad2 = softmax_cross_entropy(np.tile(logits, (2, 1)), np.tile(labels, 2))
    assert math.isclose(float(loss1), float(loss2), rel_tol=1e-12)
    np.testing.assert_allclose(grad2[:3], grad1 / 2, atol=1e-15)
