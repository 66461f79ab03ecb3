"""A strict stand-in for CuPy, backed by NumPy: the GPU code paths run on every CPU.

``LENET_XP_FAKE_CUDA=1`` (one device; ``2``: two) makes :mod:`lenet_xp.backend` hand out
:data:`cupy` wherever it would hand out CuPy. It is as strict as CuPy on a GPU, never more
lenient: CuPy's names and keywords only; device arrays that NumPy cannot see and host arrays
cannot mix with; a current device per thread; every host read a counted synchronisation;
stream capture with CUDA's rules (no cuBLAS, no synchronisation, host values frozen) and
graphs that replay on the buffers they captured; kernels run through the CUDA emulator.
What only a GPU can show: numerics to the last bit, speed, and CUPTI's counts.
"""

from lenet_xp.testing.fake_cupy.namespace import CUPY as cupy  # noqa: N811 - CuPy's name
from lenet_xp.testing.fake_cupy.namespace import CUPYX as cupyx  # noqa: N811
from lenet_xp.testing.fake_cupy.runtime import launches, synchronizations

__all__ = ["cupy", "cupyx", "launches", "synchronizations"]
