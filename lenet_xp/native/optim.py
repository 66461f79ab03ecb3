"""Adam's update of one parameter as one compiled loop (:meth:`lenet_xp.optim.optimizers.Adam.
_update` reference: a dozen NumPy passes). The scalars come in the arrays' dtype, as NumPy
casts Python floats, and each element takes the reference's operations in its order."""

from __future__ import annotations

from typing import Any

import numpy as np

from lenet_xp.native import jit


@jit
def _adam(
    data: Any, grad: Any, m: Any, v: Any, beta1: Any, one_minus_beta1: Any, beta2: Any,
    one_minus_beta2: Any, bias2_sqrt: Any, eps: Any, step_size: Any, weight_decay: Any,
) -> None:  # fmt: skip
    """All 1-D, C-contiguous, one dtype; ``weight_decay`` 0: none (else L2, added to ``grad``)."""
    for k in range(data.shape[0]):
        g = grad[k]
        if weight_decay != 0:
            g = g + weight_decay * data[k]
        m[k] = m[k] * beta1
        m[k] = m[k] + one_minus_beta1 * g
        v[k] = v[k] * beta2
        v[k] = v[k] + one_minus_beta2 * g * g
        denom = np.sqrt(v[k])
        denom = denom / bias2_sqrt
        denom = denom + eps
        denom = m[k] / denom
        denom = denom * step_size
        data[k] = data[k] - denom


def adam(
    data: Any, grad: Any, m: Any, v: Any, betas: tuple[float, float], bias2_sqrt: float,
    eps: float, step_size: float, weight_decay: float,
) -> None:  # fmt: skip
    """Adam's step for one parameter in place (see the module docstring)."""
    cast = data.dtype.type
    beta1, beta2 = betas
    _adam(
        data.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), cast(beta1),
        cast(1.0 - beta1), cast(beta2), cast(1.0 - beta2), cast(bias2_sqrt), cast(eps),
        cast(step_size), cast(weight_decay),
    )  # fmt: skip
