// Shared by every kernel source of lenet_xp (included by the loader, not on its own).
// Kernels are templates over T (float or double); flat indices are 64-bit; every kernel
// walks its outputs with a grid-stride loop, so any launch size covers any problem size.
// No atomics anywhere: each output is written by exactly one thread, in a fixed order.

#define GRID_STRIDE_LOOP(idx, total)                                              \
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;          \
       idx < (total); idx += (long long)blockDim.x * gridDim.x)

// Activations by code, the layers' formulas operation for operation: 0 ReLU max(x, 0);
// 1 sigmoid 0.5 (tanh(0.5 x) + 1); 2 tanh. Their backward from the output y: the gradient
// where y > 0; g y (1 - y); g (1 - y y).
#define ACT_RELU 0
#define ACT_SIGMOID 1
#define ACT_TANH 2

template <typename T>
__device__ __forceinline__ T activate(T x, int act) {
  if (act == ACT_SIGMOID) return T(0.5) * (tanh(T(0.5) * x) + T(1));
  if (act == ACT_TANH) return tanh(x);
  return x > T(0) ? x : T(0);
}

template <typename T>
__device__ __forceinline__ T activate_backward(T g, T y, int act) {
  if (act == ACT_SIGMOID) return g * y * (T(1) - y);
  if (act == ACT_TANH) return g * (T(1) - y * y);
  return y > T(0) ? g : T(0);
}
