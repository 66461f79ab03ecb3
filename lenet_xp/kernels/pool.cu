// Max-pooling fused with the convolution's bias before it and the ReLU after it, on
// batch-innermost (C, H, W, N) arrays; non-overlapping K x K windows (stride K).
// Reference: conv2d_forward's bias add, max_pool2d_forward, ReLU (functional/pool.py).

// y (C, H, W, N) is the convolution's GEMM output without bias. out (C, OH, OW, N) =
// relu(max over the window of (y + bias[c])); argmax = window offset i*K + j of the *first*
// maximum (ties keep the earlier offset, as PyTorch).
template <typename T>
__global__ void max_pool_bias_relu(const T* y, const T* bias, T* out, unsigned char* argmax,
                                   int n, int c, int h, int w, int k, int oh, int ow) {
  const long long total = (long long)c * oh * ow * n;
  GRID_STRIDE_LOOP(idx, total) {
    long long rest = idx;
    const int in = rest % n; rest /= n;
    const int ox = rest % ow; rest /= ow;
    const int oy = rest % oh;
    const int ic = rest / oh;
    const T b = bias ? bias[ic] : T(0);
    const long long base = (((long long)ic * h + oy * k) * w + ox * k) * n + in;
    T best = y[base] + b;
    int best_offset = 0;
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < k; ++j) {
        const T value = y[base + ((long long)i * w + j) * n] + b;
        if (value > best) {  // strict: an equal later value never takes over
          best = value;
          best_offset = i * k + j;
        }
      }
    }
    out[idx] = best > T(0) ? best : T(0);
    argmax[idx] = (unsigned char)best_offset;
  }
}

// Backward of max_pool_bias_relu: grad_y (C, H, W, N) gets grad_out where the pixel is its
// window's first maximum and the pooled output was positive (ReLU's gradient), else 0.
// Pixels outside every window (H or W not a multiple of K) get 0.
template <typename T>
__global__ void max_pool_relu_backward(const T* grad_out, const T* out,
                                       const unsigned char* argmax, T* grad_y, int n, int c,
                                       int h, int w, int k, int oh, int ow) {
  const long long total = (long long)c * h * w * n;
  GRID_STRIDE_LOOP(idx, total) {
    long long rest = idx;
    const int in = rest % n; rest /= n;
    const int x_ = rest % w; rest /= w;
    const int y = rest % h;
    const int ic = rest / h;
    const int oy = y / k, ox = x_ / k;
    T grad = 0;
    if (oy < oh && ox < ow) {
      const long long o = (((long long)ic * oh + oy) * ow + ox) * n + in;
      if (argmax[o] == (y % k) * k + (x_ % k) && out[o] > T(0)) grad = grad_out[o];
    }
    grad_y[idx] = grad;
  }
}
