"""``RBFOutput``: LeCun et al. 1998's output layer of Euclidean radial basis function units.

Unit ``j`` outputs the penalty ``y_j = sum_i (x_i - c_ji)^2``: the squared distance of F6's
84 outputs from the centre ``c_j`` of class ``j``. The centres are fixed ±1 codes, stylised
7x12 bitmaps of the digits (the paper's Fig. 3), so F6's units, whose tanh squashing reaches
±1 without saturating, are trained towards a drawing of the right digit.

The layer returns ``logits = -y``: the nearest centre has the largest logit, and
``functional.loss.rbf_loss`` (softmax cross-entropy with an extra constant logit) on them is
the paper's loss. Where our CUDA kernels run, forward and backward are one launch each
(``kernels/rbf.cu``; this module's array code is their reference).
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import asnumpy, get_array_module, host_zeros
from lenet_xp.kernels.ops import matmul
from lenet_xp.layers.module import Module, Parameter

#: The digits 0-9 on a 7-wide, 12-tall grid ('#' = +1, '.' = -1), drawn after LeCun et al.
#: 1998, Fig. 3 (ours, not a copy of theirs: legible and pairwise at least 7 pixels apart).
DIGIT_PICTURES: tuple[tuple[str, ...], ...] = (
    (".......", "..###..", ".#...#.", "#.....#", "#.....#", "#.....#",
     "#.....#", "#.....#", "#.....#", ".#...#.", "..###..", "......."),  # 0
    (".......", "...#...", "..##...", ".#.#...", "...#...", "...#...",
     "...#...", "...#...", "...#...", "...#...", ".#####.", "......."),  # 1
    (".......", "..###..", ".#...#.", ".....#.", ".....#.", "....#..",
     "...#...", "..#....", ".#.....", ".#.....", ".#####.", "......."),  # 2
    (".......", ".####..", ".....#.", ".....#.", ".....#.", "..###..",
     ".....#.", ".....#.", ".....#.", ".....#.", ".####..", "......."),  # 3
    (".......", "....#..", "...##..", "..#.#..", ".#..#..", "#...#..",
     "#######", "....#..", "....#..", "....#..", "....#..", "......."),  # 4
    (".......", ".#####.", ".#.....", ".#.....", ".#.....", ".####..",
     ".....#.", ".....#.", ".....#.", ".#...#.", "..###..", "......."),  # 5
    (".......", "...##..", "..#....", ".#.....", ".#.....", ".####..",
     ".#...#.", ".#...#.", ".#...#.", ".#...#.", "..###..", "......."),  # 6
    (".......", "#######", ".....#.", ".....#.", "....#..", "....#..",
     "...#...", "...#...", "..#....", "..#....", "..#....", "......."),  # 7
    (".......", "..###..", ".#...#.", ".#...#.", ".#...#.", "..###..",
     ".#...#.", ".#...#.", ".#...#.", ".#...#.", "..###..", "......."),  # 8
    (".......", "..###..", ".#...#.", ".#...#.", ".#...#.", ".#...#.",
     "..####.", ".....#.", ".....#.", "....#..", "..##...", "......."),  # 9
)  # fmt: skip
BITMAP_WIDTH, BITMAP_HEIGHT = 7, 12


def bitmaps(pictures: tuple[tuple[str, ...], ...] = DIGIT_PICTURES) -> Any:
    """``(len(pictures), 84)`` float64 host array: each picture's rows, row-major, ±1."""
    codes = host_zeros((len(pictures), BITMAP_WIDTH * BITMAP_HEIGHT), "float64")
    for d, picture in enumerate(pictures):
        if len(picture) != BITMAP_HEIGHT or any(len(row) != BITMAP_WIDTH for row in picture):
            raise ValueError(f"picture {d} is not {BITMAP_HEIGHT} rows of {BITMAP_WIDTH}")
        codes[d] = [1.0 if ch == "#" else -1.0 for row in picture for ch in row]
    return codes


#: The default centres: ``(10, 84)`` float64, ±1, read-only (row ``d`` is digit ``d``).
DIGIT_BITMAPS = bitmaps()
DIGIT_BITMAPS.flags.writeable = False


class RBFOutput(Module):
    """Euclidean RBF units: ``x (N, in_features)`` -> ``logits (N, K) = -y``,
    ``y[n, j] = sum_i (x[n, i] - centres[j, i])^2``.

    ``centres (K, in_features)`` (default :data:`DIGIT_BITMAPS`, K = 10, 84 features) is a
    :class:`Parameter` in ``dtype``, so it is counted (840: the paper's 60,000 trainable
    parameters plus these make the 60,840 usually quoted) and saved, but it is not trained:
    ``backward`` leaves its ``grad`` as ``None``, which optimizers skip, as the paper kept
    the centres fixed. ``backward`` returns the gradient of ``x``.
    """

    def __init__(
        self, in_features: int = 84, centres: Any = None, *, dtype: str = "float32"
    ) -> None:
        codes = DIGIT_BITMAPS if centres is None else asnumpy(centres)
        if codes.ndim != 2 or codes.shape[1] != in_features:
            raise ValueError(
                f"centres must have shape (classes, {in_features}), got {tuple(codes.shape)}"
            )
        self.in_features = in_features
        self.centres = Parameter(codes.astype(dtype))  # a copy, writeable
        self._x: Any = None

    def forward(self, x: Any) -> Any:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"RBFOutput expects (N, {self.in_features}) input, got {x.shape}")
        c = self.centres.data
        kernels = self._kernels(x)
        if kernels is not None:  # one launch: rbf.cu
            x = get_array_module(x).ascontiguousarray(x)
            self._x = x if self.training else None
            return kernels.rbf_logits(x, c)
        # -|x - c|^2 = 2 x.c - |x|^2 - |c|^2: one GEMM instead of an (N, K, F) difference
        logits = matmul(x, c.T, kernels)
        logits *= 2.0
        logits -= (x * x).sum(axis=1, keepdims=True)
        logits -= (c * c).sum(axis=1)
        self._x = x if self.training else None
        return logits

    def backward(self, grad_logits: Any) -> Any:
        """``grad_logits (N, K)`` -> ``grad_x (N, in_features) = 2 (g @ c - x * sum_j g_j)``."""
        x, kernels = self._x, self._kernels(grad_logits)
        if kernels is not None:  # one launch: rbf.cu
            self._x = None
            grad = get_array_module(grad_logits).ascontiguousarray(grad_logits)
            return kernels.rbf_backward(grad, x, self.centres.data)
        grad_x = matmul(grad_logits, self.centres.data, kernels)
        grad_x -= x * grad_logits.sum(axis=1, keepdims=True)
        grad_x *= 2.0
        self._x = None
        return grad_x

    def macs(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
        """One multiply-add per (class, feature): the squared differences."""
        return y_shape[1] * self.in_features
