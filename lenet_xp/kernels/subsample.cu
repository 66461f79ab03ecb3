// LeCun's trainable subsampling (S2, S4) between the convolution before it and the
// activation after it, on batch-innermost (C, H, W, N) arrays; non-overlapping K x K windows
// (the window helpers of common.cuh). Reference: conv2d_forward's bias add,
// functional/activation.py, layers/subsample.py (functional/pool.py's average pool).
#define SUBSAMPLE_THREADS 256

// y (C, H, W, N): the convolution's GEMM output without bias. Per window of output pixel o:
//   a = act(y + bias[c]) on each pixel (kept in act_out (C, H, W, N) for the backward),
//   mean[o] = (the window's a, summed in row-major offset order) * 1 / K^2,
//   out[o] = act2(mean[o] * (coeff[c] * K^2) + sbias[c])     (C, OH, OW, N).
template <typename T>
__global__ void bias_act_subsample_act(const T* y, const T* bias, const T* coeff,
                                       const T* sbias, T* act_out, T* mean, T* out, int n,
                                       int c, int h, int w, int k, int oh, int ow, int act,
                                       int act2) {
  const long long total = (long long)c * oh * ow * n;
  const T inv_area = (T)(1.0 / ((double)k * k));
  GRID_STRIDE_LOOP(idx, total) {
    const Chwn o = chwn_at(idx, n, oh, ow);
    const T b = bias[o.c];
    const T sum = bias_act_window_sum(y, b, act_out, o, n, h, w, k, act);
    const T m = sum * inv_area;
    mean[idx] = m;
    out[idx] = activate(m * (coeff[o.c] * (T)(k * k)) + sbias[o.c], act2);
  }
}

// Backward of bias_act_subsample_act w.r.t. y: inside a window, with g = act2's backward of
// grad_out[o] (from out[o]), grad_y = act's backward (from act_out) of
// g * (coeff[c] * K^2) * 1 / K^2; 0 outside every window.
template <typename T>
__global__ void act_subsample_act_backward(const T* grad_out, const T* out, const T* act_out,
                                           const T* coeff, T* grad_y, int n, int c, int h,
                                           int w, int k, int oh, int ow, int act, int act2) {
  const long long total = (long long)c * h * w * n;
  const T inv_area = (T)(1.0 / ((double)k * k));
  GRID_STRIDE_LOOP(idx, total) {
    const Chwn p = chwn_at(idx, n, h, w);
    const long long o = window_of(p, n, k, oh, ow);
    T grad = 0;
    if (o >= 0) {
      const T g = activate_backward(grad_out[o], out[o], act2);
      grad = activate_backward(g * (coeff[p.c] * (T)(k * k)) * inv_area, act_out[idx], act);
    }
    grad_y[idx] = grad;
  }
}

// The subsampling's parameter gradients, one block of SUBSAMPLE_THREADS per channel (grid-
// stride over channels): with g = act2's backward of grad_out (from out), all (C, OH, OW, N),
//   grad_coeff[c] = sum over the channel of g * mean, times K^2;  grad_sbias[c] = sum of g.
// Each thread sums its elements in order, then the block in a fixed tree (deterministic).
template <typename T>
__global__ void subsample_grads(const T* grad_out, const T* out, const T* mean,
                                T* grad_coeff, T* grad_sbias, int n, int c, int oh, int ow,
                                int k, int act2) {
  __shared__ double part_coeff[SUBSAMPLE_THREADS];
  __shared__ double part_bias[SUBSAMPLE_THREADS];
  const int tid = threadIdx.x;
  const long long per_channel = (long long)oh * ow * n;
  for (int ch = blockIdx.x; ch < c; ch += gridDim.x) {
    double my_coeff = 0, my_bias = 0;
    for (long long e = ch * per_channel + tid; e < (ch + 1) * per_channel; e += blockDim.x) {
      const T g = activate_backward(grad_out[e], out[e], act2);
      my_coeff += (double)(g * mean[e]);
      my_bias += (double)g;
    }
    part_coeff[tid] = my_coeff;
    part_bias[tid] = my_bias;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
      if (tid < half) {
        part_coeff[tid] += part_coeff[tid + half];
        part_bias[tid] += part_bias[tid + half];
      }
      __syncthreads();
    }
    if (tid == 0) {
      grad_coeff[ch] = (T)part_coeff[0] * (T)(k * k);
      grad_sbias[ch] = (T)part_bias[0];
    }
    __syncthreads();  // the shared sums are rewritten for the next channel
  }
}
