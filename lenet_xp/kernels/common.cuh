// Shared by every kernel source of lenet_xp (included by the loader, not on its own).
// Kernels are templates over T (float or double); flat indices are 64-bit; every kernel
// walks its outputs with a grid-stride loop, so any launch size covers any problem size.
// No atomics anywhere: each output is written by exactly one thread, in a fixed order.

#define GRID_STRIDE_LOOP(idx, total)                                              \
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;          \
       idx < (total); idx += (long long)blockDim.x * gridDim.x)

// Activations by code, the layers' formulas operation for operation: 0 ReLU max(x, 0);
// 1 sigmoid 0.5 (tanh(0.5 x) + 1); 2 tanh; 3 LeCun's scaled tanh A tanh(S x) (A = 1.7159,
// S = 2/3). Their backward from the output y: the gradient where y > 0; g y (1 - y);
// g (1 - y y); g (A S) (1 - t t) with t = y / A.
#define ACT_RELU 0
#define ACT_SIGMOID 1
#define ACT_TANH 2
#define ACT_LECUN_TANH 3
#define LECUN_A 1.7159
#define LECUN_S (2.0 / 3.0)

template <typename T>
__device__ __forceinline__ T activate(T x, int act) {
  if (act == ACT_SIGMOID) return T(0.5) * (tanh(T(0.5) * x) + T(1));
  if (act == ACT_TANH) return tanh(x);
  if (act == ACT_LECUN_TANH) return T(LECUN_A) * tanh(T(LECUN_S) * x);
  return x > T(0) ? x : T(0);
}

template <typename T>
__device__ __forceinline__ T activate_backward(T g, T y, int act) {
  if (act == ACT_SIGMOID) return g * y * (T(1) - y);
  if (act == ACT_TANH) return g * (T(1) - y * y);
  if (act == ACT_LECUN_TANH) {
    const T t = y / T(LECUN_A);
    return g * T(LECUN_A * LECUN_S) * (T(1) - t * t);
  }
  return y > T(0) ? g : T(0);
}

// Batch-innermost images (C, H, W, N): the position of flat index idx, and back.
struct Chwn {
  int c, y, x, n;
};

__device__ __forceinline__ Chwn chwn_at(long long idx, int n, int h, int w) {
  Chwn at;
  at.n = idx % n; idx /= n;
  at.x = idx % w; idx /= w;
  at.y = idx % h;
  at.c = idx / h;
  return at;
}

__device__ __forceinline__ long long chwn_index(int c, int y, int x, int in, int n, int h,
                                                int w) {
  return (((long long)c * h + y) * w + x) * n + in;
}

// Non-overlapping K x K windows (stride K) of a (C, H, W, N) input, one per pixel of a
// (C, OH, OW, N) output. window_start: the input index of output pixel o's window's
// top-left pixel; window_step(i, j): how far its offset (i, j) is from there;
// window_of: the output index of the window holding input pixel p (-1: none, where H or W
// is not a multiple of K).
__device__ __forceinline__ long long window_start(const Chwn& o, int n, int h, int w, int k) {
  return chwn_index(o.c, o.y * k, o.x * k, o.n, n, h, w);
}

__device__ __forceinline__ long long window_step(int i, int j, int n, int w) {
  return ((long long)i * w + j) * n;
}

__device__ __forceinline__ long long window_of(const Chwn& p, int n, int k, int oh, int ow) {
  const int oy = p.y / k, ox = p.x / k;
  return (oy < oh && ox < ow) ? chwn_index(p.c, oy, ox, p.n, n, oh, ow) : -1;
}

// Output pixel o's window of y with bias b added and activation act applied, each pixel
// kept in act_out (for the backward); returns the window's sum, in row-major offset order
// (the average pool's and the trainable subsampling's forward).
template <typename T>
__device__ __forceinline__ T bias_act_window_sum(const T* y, T b, T* act_out, const Chwn& o,
                                                 int n, int h, int w, int k, int act) {
  const long long base = window_start(o, n, h, w, k);
  T sum = 0;
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) {
      const long long at = base + window_step(i, j, n, w);
      const T a = activate(y[at] + b, act);
      act_out[at] = a;
      sum = (i == 0 && j == 0) ? a : sum + a;
    }
  }
  return sum;
}
