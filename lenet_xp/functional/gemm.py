"""The two GEMM shapes of convolution, cut into column blocks where that is faster.

On the CPU (see ``backend.gemm_block``) a long GEMM runs as several short ones whose
operands fit in cache and which OpenBLAS computes with its small-matrix kernels; on a GPU
each is one call.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import gemm_block, get_array_module


def matmul_cols(a: Any, b: Any) -> Any:
    """``a (M, K) @ b (K, P) -> (M, P)``, computed block of columns by block of columns."""
    xp = get_array_module(a, b)
    block = gemm_block(xp)
    p = b.shape[1]
    if block is None or p <= block:
        return a @ b
    out = xp.empty((a.shape[0], p), dtype=xp.result_type(a, b))
    for start in range(0, p, block):
        xp.matmul(a, b[:, start : start + block], out=out[:, start : start + block])
    return out


def matmul_nt(a: Any, b: Any) -> Any:
    """``a (M, P) @ b (K, P).T -> (M, K)``: a sum over the long ``P`` axis, taken in blocks
    (as ``b_block @ a_block.T``, the faster orientation for OpenBLAS)."""
    xp = get_array_module(a, b)
    block = gemm_block(xp)
    p = a.shape[1]
    if block is None:
        return a @ b.T
    out_t = b[:, :block] @ a[:, :block].T
    for start in range(block, p, block):
        out_t += b[:, start : start + block] @ a[:, start : start + block].T
    return out_t.T
