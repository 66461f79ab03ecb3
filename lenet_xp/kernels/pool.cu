// Pooling fused with the convolution's bias before it and the activation next to it, on
// batch-innermost (C, H, W, N) arrays; non-overlapping K x K windows (stride K: the window
// helpers of common.cuh). Reference: conv2d_forward's bias add, functional/pool.py,
// functional/activation.py.

// y (C, H, W, N) is the convolution's GEMM output without bias. out (C, OH, OW, N) =
// act(max over the window of (y + bias[c])); argmax = window offset i*K + j of the *first*
// maximum (ties keep the earlier offset, as PyTorch). (Max-pooling before a monotone
// activation: the layers' order for --pool max.)
template <typename T>
__global__ void max_pool_bias_act(const T* y, const T* bias, T* out, unsigned char* argmax,
                                  int n, int c, int h, int w, int k, int oh, int ow, int act) {
  const long long total = (long long)c * oh * ow * n;
  GRID_STRIDE_LOOP(idx, total) {
    const Chwn o = chwn_at(idx, n, oh, ow);
    const T b = bias ? bias[o.c] : T(0);
    const long long base = window_start(o, n, h, w, k);
    T best = y[base] + b;
    int best_offset = 0;
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < k; ++j) {
        const T value = y[base + window_step(i, j, n, w)] + b;
        if (value > best) {  // strict: an equal later value never takes over
          best = value;
          best_offset = i * k + j;
        }
      }
    }
    out[idx] = activate(best, act);
    argmax[idx] = (unsigned char)best_offset;
  }
}

// Backward of max_pool_bias_act: grad_y (C, H, W, N) gets the activation's backward of
// grad_out where the pixel is its window's first maximum, else 0. Pixels outside every
// window (H or W not a multiple of K) get 0.
template <typename T>
__global__ void max_pool_act_backward(const T* grad_out, const T* out,
                                      const unsigned char* argmax, T* grad_y, int n, int c,
                                      int h, int w, int k, int oh, int ow, int act) {
  const long long total = (long long)c * h * w * n;
  GRID_STRIDE_LOOP(idx, total) {
    const Chwn p = chwn_at(idx, n, h, w);
    const long long o = window_of(p, n, k, oh, ow);
    T grad = 0;
    if (o >= 0 && argmax[o] == (p.y % k) * k + (p.x % k)) {
      grad = activate_backward(grad_out[o], out[o], act);
    }
    grad_y[idx] = grad;
  }
}

// The activation before average pooling (the layers' order for --pool avg): act_out (C, H,
// W, N) = act(y + bias[c]) on every pixel of a window (kept for the backward), out (C, OH,
// OW, N) = the window's activations summed in row-major offset order, times 1 / K^2.
template <typename T>
__global__ void bias_act_avg_pool(const T* y, const T* bias, T* act_out, T* out, int n, int c,
                                  int h, int w, int k, int oh, int ow, int act) {
  const long long total = (long long)c * oh * ow * n;
  const T scale = (T)(1.0 / ((double)k * k));
  GRID_STRIDE_LOOP(idx, total) {
    const Chwn o = chwn_at(idx, n, oh, ow);
    const T b = bias ? bias[o.c] : T(0);
    const T sum = bias_act_window_sum(y, b, act_out, o, n, h, w, k, act);
    out[idx] = sum * scale;
  }
}

// Backward of bias_act_avg_pool: grad_y = the activation's backward (from act_out) of
// grad_out / K^2 inside a window, 0 outside every window.
template <typename T>
__global__ void act_avg_pool_backward(const T* grad_out, const T* act_out, T* grad_y, int n,
                                      int c, int h, int w, int k, int oh, int ow, int act) {
  const long long total = (long long)c * h * w * n;
  const T scale = (T)(1.0 / ((double)k * k));
  GRID_STRIDE_LOOP(idx, total) {
    const long long o = window_of(chwn_at(idx, n, h, w), n, k, oh, ow);
    grad_y[idx] = o < 0 ? T(0) : activate_backward(grad_out[o] * scale, act_out[idx], act);
  }
}
