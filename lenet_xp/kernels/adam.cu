// Adam / AdamW over ALL parameters in one launch: params, grads and both moments are flat
// buffers (the model's parameters are views of `param`). torch.optim.Adam's formulas, as
// optim.Adam (the reference). The step t is counters[0] (already counted for this step by
// the loss kernel), and the learning rate lr_of_step[t - 1], both read on the device, so a
// captured step needs no host values.
template <typename T>
__global__ void adam(T* param, const T* grad, T* exp_avg, T* exp_avg_sq,
                     const double* lr_of_step, const long long* counters, double beta1,
                     double beta2, double eps, double weight_decay, int decoupled,
                     long long size) {
  const long long t = counters[0];
  const double lr = lr_of_step[t - 1];
  const T step_size = (T)(lr / (1.0 - pow(beta1, (double)t)));
  const T bias2_sqrt = (T)sqrt(1.0 - pow(beta2, (double)t));
  const T b1 = (T)beta1, b2 = (T)beta2, wd = (T)weight_decay;
  // 1 - beta and the decay factor in double, then rounded (as the reference): T(1) - b2
  // in float is 0.00099998713 for beta2 = 0.999, 1.3e-5 off 0.001.
  const T c1 = (T)(1.0 - beta1), c2 = (T)(1.0 - beta2), decay = (T)(1.0 - lr * weight_decay);
  GRID_STRIDE_LOOP(i, size) {
    T p = param[i];
    T g = grad[i];
    if (weight_decay != 0.0) {
      if (decoupled) p *= decay;
      else g += wd * p;
    }
    const T m = b1 * exp_avg[i] + c1 * g;
    const T v = b2 * exp_avg_sq[i] + c2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p - step_size * m / (sqrt(v) / bias2_sqrt + (T)eps);
  }
}
