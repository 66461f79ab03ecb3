// Batch normalisation of (N, F) inputs in training, fused with the activation after it:
// one thread per feature walks its column. Reference: layers/batchnorm.py (_BatchNorm) and
// functional/batchnorm.py, operation for operation; the sums over the batch run in row
// order (NumPy's are pairwise: the same to rounding).

// x (N, F) contiguous -> y = act(x_hat * weight + bias), x_hat = (x - mean) * inv_std with
// the batch's mean and biased variance; running_mean/var updated in place (momentum, the
// unbiased variance); tracked[0] += 1. x_hat (N, F) and inv_std (F,) kept for the backward.
// act: a code of common.cuh, or -1: none.
template <typename T>
__global__ void batch_norm_act(const T* x, const T* weight, const T* bias, T* running_mean,
                               T* running_var, long long* tracked, T* x_hat, T* inv_std,
                               T* y, int n, int f, double eps, double momentum, int act) {
  const T inv_n = T(1) / T(n);
  GRID_STRIDE_LOOP(j, f) {
    T sum = 0;
    for (int i = 0; i < n; ++i) sum += x[(long long)i * f + j];
    const T mean = sum * inv_n;
    T squares = 0;
    for (int i = 0; i < n; ++i) {
      const T d = x[(long long)i * f + j] - mean;
      squares += d * d;
    }
    const T var = squares * inv_n;
    running_mean[j] = running_mean[j] * (T)(1.0 - momentum) + (T)momentum * mean;
    const double unbiased = momentum * n / (n > 1 ? n - 1 : 1);
    running_var[j] = running_var[j] * (T)(1.0 - momentum) + (T)unbiased * var;
    const T s = T(1) / sqrt(var + (T)eps);
    inv_std[j] = s;
    for (int i = 0; i < n; ++i) {
      const long long at = (long long)i * f + j;
      const T h = (x[at] - mean) * s;
      x_hat[at] = h;
      const T value = h * weight[j] + bias[j];
      y[at] = act < 0 ? value : activate(value, act);
    }
    if (j == 0) tracked[0] += 1;
  }
}

// Backward of batch_norm_act: grad_y (N, F) through the activation (from its output y),
// then batch norm's backward with the batch's statistics: grad_x (N, F), grad_weight (F,),
// grad_bias (F,).
template <typename T>
__global__ void batch_norm_act_backward(const T* grad_y, const T* y, const T* x_hat,
                                        const T* inv_std, const T* weight, T* grad_x,
                                        T* grad_weight, T* grad_bias, int n, int f, int act) {
  const T inv_n = T(1) / T(n);
  GRID_STRIDE_LOOP(j, f) {
    T sum_g = 0, sum_gh = 0, sum_gxh = 0, sum_gxh_h = 0;
    const T w = weight[j];
    for (int i = 0; i < n; ++i) {
      const long long at = (long long)i * f + j;
      const T g = act < 0 ? grad_y[at] : activate_backward(grad_y[at], y[at], act);
      const T gxh = g * w;
      sum_g += g;
      sum_gh += g * x_hat[at];
      sum_gxh += gxh;
      sum_gxh_h += gxh * x_hat[at];
    }
    grad_weight[j] = sum_gh;
    grad_bias[j] = sum_g;
    const T mean_gxh = sum_gxh * inv_n, mean_gxh_h = sum_gxh_h * inv_n;
    for (int i = 0; i < n; ++i) {
      const long long at = (long long)i * f + j;
      const T g = act < 0 ? grad_y[at] : activate_backward(grad_y[at], y[at], act);
      grad_x[at] = inv_std[j] * (g * w - mean_gxh - x_hat[at] * mean_gxh_h);
    }
  }
}
