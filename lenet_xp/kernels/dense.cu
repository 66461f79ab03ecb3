// Epilogues of a cuBLAS GEMM on feature-major (M, N) arrays (N = batch, innermost), and the
// strided GEMM of our own that a captured CUDA graph needs (CuPy refuses cuBLAS during
// stream capture). Reference: layers/linear.py, layers/activation.py (ReLU).

// y (M, N) contiguous (feature-major: a convolution's GEMM output (C, H*W*N)):
// y = act(y + bias[m]) (act: a code of common.cuh, or -1: none).
template <typename T>
__global__ void bias_act(T* y, const T* bias, int m, long long n, int act) {
  GRID_STRIDE_LOOP(idx, (long long)m * n) {
    const T value = y[idx] + bias[idx / n];
    y[idx] = act < 0 ? value : activate(value, act);
  }
}

// y (R, C) contiguous (batch-major: a Linear's output): y = act(y + bias[c]) (act: a code of
// common.cuh, or -1: none).
template <typename T>
__global__ void bias_act_cols(T* y, const T* bias, long long rows, int cols, int act) {
  GRID_STRIDE_LOOP(idx, rows * cols) {
    const T value = y[idx] + bias[idx % cols];
    y[idx] = act < 0 ? value : activate(value, act);
  }
}

// grad, in place: the backward of activation act (a code of common.cuh) from its output out
// (same size, contiguous).
template <typename T>
__global__ void act_backward(T* grad, const T* out, long long size, int act) {
  GRID_STRIDE_LOOP(idx, size) { grad[idx] = activate_backward(grad[idx], out[idx], act); }
}

// grad (M, N) contiguous: grad = grad where out > 0, else 0 (ReLU's backward).
template <typename T>
__global__ void relu_mask(T* grad, const T* out, long long size) {
  GRID_STRIDE_LOOP(idx, size) {
    if (!(out[idx] > T(0))) grad[idx] = T(0);
  }
}

// C = A @ B with any element strides: A[m, k] = A[m * sam + k * sak], B[k, n] = B[k * sbk +
// n * sbn], C[m, n] = C[m * scm + n * scn]. 16 x 16 tiles, 16 x 16 threads per block. With
// gridDim.z > 1 the K axis is split into chunks of kchunk (a multiple of 16): block z writes
// its partial sum to partial (gridDim.z, M, N) and gemm_reduce finishes. Epilogue (when
// gridDim.z == 1, else in gemm_reduce): + bias[m] (if bias), zero where mask[m, n] <= 0 (if
// mask; ReLU's backward; mask has C's strides), ReLU (if relu).
#define GEMM_TILE 16

template <typename T>
__device__ __forceinline__ T gemm_epilogue(T acc, const T* bias, const T* mask, long long moff,
                                           int row, int relu) {
  if (bias) acc += bias[row];
  if (mask && !(mask[moff] > T(0))) acc = T(0);
  if (relu && !(acc > T(0))) acc = T(0);
  return acc;
}

template <typename T>
__global__ void gemm(const T* a, long long sam, long long sak, const T* b, long long sbk,
                     long long sbn, T* c, long long scm, long long scn, T* partial,
                     const T* bias, const T* mask, int m, int n, int k, int kchunk, int relu) {
  __shared__ T a_tile[GEMM_TILE][GEMM_TILE + 1];
  __shared__ T b_tile[GEMM_TILE][GEMM_TILE + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.y * GEMM_TILE + ty;
  const int col = blockIdx.x * GEMM_TILE + tx;
  const int k_begin = blockIdx.z * kchunk;
  const int k_end = min(k, k_begin + kchunk);
  T acc = 0;
  for (int k0 = k_begin; k0 < k_end; k0 += GEMM_TILE) {
    const int ka = k0 + tx, kb = k0 + ty;
    a_tile[ty][tx] = (row < m && ka < k_end) ? a[row * sam + ka * sak] : T(0);
    b_tile[ty][tx] = (kb < k_end && col < n) ? b[kb * sbk + col * sbn] : T(0);
    __syncthreads();
    for (int kk = 0; kk < GEMM_TILE; ++kk) acc += a_tile[ty][kk] * b_tile[kk][tx];
    __syncthreads();
  }
  if (row < m && col < n) {
    if (gridDim.z == 1) {
      const long long off = row * scm + col * scn;
      c[off] = gemm_epilogue(acc, bias, mask, off, row, relu);
    } else {
      partial[((long long)blockIdx.z * m + row) * n + col] = acc;
    }
  }
}

// Sums gemm's partials (splits, M, N) in split order, applies the epilogue, writes C.
template <typename T>
__global__ void gemm_reduce(const T* partial, int splits, T* c, long long scm, long long scn,
                            const T* bias, const T* mask, int m, int n, int relu) {
  GRID_STRIDE_LOOP(idx, (long long)m * n) {
    const int row = idx / n, col = idx % n;
    T acc = 0;
    for (int s = 0; s < splits; ++s) acc += partial[(long long)s * m * n + idx];
    const long long off = row * scm + col * scn;
    c[off] = gemm_epilogue(acc, bias, mask, off, row, relu);
  }
}
