// Shared by every kernel source of lenet_xp (included by the loader, not on its own).
// Kernels are templates over T (float or double); flat indices are 64-bit; every kernel
// walks its outputs with a grid-stride loop, so any launch size covers any problem size.
// No atomics anywhere: each output is written by exactly one thread, in a fixed order.

#define GRID_STRIDE_LOOP(idx, total)                                              \
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;          \
       idx < (total); idx += (long long)blockDim.x * gridDim.x)
