"""Softmax cross-entropy on logits and LeCun et al. 1998's RBF loss, mean over the batch.
Pure functions."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.kernels.ops import Kernels


def log_softmax(logits: Any) -> Any:
    """Row-wise ``log softmax`` of ``logits (N, K)``, stable for any finite input (log-sum-exp)."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def _rows(logits: Any, labels: Any) -> Any:
    """``arange(N)`` on the logits' device, after checking ``labels`` is ``(N,)``."""
    n = logits.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels shape {labels.shape} does not match logits {logits.shape}")
    return get_array_module(logits).arange(n)


def _minus_onehot_over_n(probs: Any, rows: Any, labels: Any) -> Any:
    """``(probs - onehot(labels)) / N`` in place in ``probs (N, K)``: the gradient of the mean
    cross-entropy with respect to the logits."""
    probs[rows, labels] -= 1.0
    probs *= 1.0 / probs.shape[0]
    return probs


def softmax_cross_entropy(
    logits: Any, labels: Any, kernels: Kernels | None = None, sums: tuple[Any, Any] | None = None
) -> tuple[Any, Any]:
    """Mean cross-entropy of ``logits (N, K)`` against integer ``labels (N,)`` and its gradient.

    Returns ``(loss, grad_logits)``: ``loss`` is a 0-d array on the logits' device (no host
    sync), ``grad_logits (N, K) = (softmax(logits) - onehot(labels)) / N``. ``kernels``: our
    CUDA kernels, which compute all of it in one launch (``softmax_cross_entropy``), and with
    ``sums = (loss_sum, correct)`` (0-d ``float64`` and ``int64`` device arrays) also add the
    batch's summed loss and correct predictions to them (an epoch's running sums).
    """
    if kernels is not None:
        return _softmax_cross_entropy_kernel(logits, labels, kernels, sums)
    if sums is not None:
        raise ValueError("running sums are kept by the CUDA kernel only")
    xp = get_array_module(logits)
    rows = _rows(logits, labels)
    log_probs = log_softmax(logits)
    loss = -log_probs[rows, labels].mean()
    return loss, _minus_onehot_over_n(xp.exp(log_probs), rows, labels)


def _softmax_cross_entropy_kernel(
    logits: Any, labels: Any, kernels: Kernels, sums: tuple[Any, Any] | None,
    rubbish: float | None = None,
) -> tuple[Any, Any]:  # fmt: skip
    xp = get_array_module(logits)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels shape {labels.shape} does not match logits {logits.shape}")
    grad = xp.empty(logits.shape, logits.dtype)
    loss = xp.empty(1, logits.dtype)
    loss_sum, correct = (None, None) if sums is None else sums
    kernels.softmax_cross_entropy(
        logits.T, labels, grad.T, loss, loss_sum, correct, rubbish=rubbish
    )
    return loss.reshape(()), grad


#: Default ``j`` of :func:`rbf_loss`. The paper asks only for a positive constant (it gives
#: no value). The gradient pulls the right class's penalty ``y_D`` down with weight about
#: ``sigmoid(y_D - j)`` (other classes far) and pushes a wrong class ``i`` up with weight about
#: ``exp(-(y_i - min(j, min_k y_k)))``. We take ``j = 1``, the scale of one F6 unit's squared
#: error: while every penalty is well above 1 (early on F6 is near 0 and every penalty is
#: about 84) the rubbish class takes the normalisation and the loss is the paper's first term
#: alone, the squared distance to the right bitmap; a wrong class is pushed only while its
#: penalty is within a few units of ``min(j, smallest penalty)``, and "the penalties of
#: classes that are already very large" are left alone, as the paper intends.
RBF_LOSS_J = 1.0


def rbf_loss(
    logits: Any, labels: Any, j: float = RBF_LOSS_J, kernels: Kernels | None = None,
    sums: tuple[Any, Any] | None = None,
) -> tuple[Any, Any]:  # fmt: skip
    """LeCun et al. 1998's loss (section II-C) on RBF logits ``(N, K) = -y`` (``y``: the
    penalties of :class:`~lenet_xp.layers.RBFOutput`) against integer ``labels (N,)``, and its
    gradient:

    ``E = mean_p ( y[p, D_p] + log(exp(-j) + sum_i exp(-y[p, i])) )``

    that is, softmax cross-entropy over the K logits plus one constant logit ``-j`` for a
    "rubbish" class that is never the label: as ``j -> inf`` (``j=math.inf`` works) it is
    :func:`softmax_cross_entropy`. ``E >= 0``. Stable for any finite logits (log-sum-exp).
    Returns ``(loss, grad_logits)``: ``loss`` a 0-d array on the logits' device (no host
    sync), ``grad_logits (N, K) = (p - onehot(labels)) / N`` with ``p`` the softmax over
    all K + 1 logits restricted to the K real ones. ``kernels``, ``sums``: as
    :func:`softmax_cross_entropy`'s (one launch, the rubbish logit in the kernel's softmax).
    """
    if kernels is not None:
        return _softmax_cross_entropy_kernel(logits, labels, kernels, sums, rubbish=-float(j))
    if sums is not None:
        raise ValueError("running sums are kept by the CUDA kernel only")
    xp = get_array_module(logits)
    rows = _rows(logits, labels)
    rubbish = -float(j)
    top = xp.maximum(logits.max(axis=1, keepdims=True), rubbish)  # (N, 1), finite
    exp = xp.exp(logits - top)
    total = exp.sum(axis=1, keepdims=True) + xp.exp(rubbish - top)
    loss = (top[:, 0] + xp.log(total[:, 0]) - logits[rows, labels]).mean()
    return loss, _minus_onehot_over_n(exp / total, rows, labels)
