// The optimizers' updates and the weight average over ALL parameters in one launch each:
// params, grads and state are flat buffers (the model's parameters are views of `param`).
// Reference: optim/optimizers.py (SGD, Adam, AdamW) and optim/averaging.py (ParameterEMA),
// operation for operation in the same order. Nothing comes from the host per step: the
// learning rate is lr_of_step[clock[0]] (clock[0]: global steps done), the optimizer's
// step count clock[2] (updates done before this one) and the average's clock[3], so a
// captured step replays with the right values. A step past the table's end (lr_steps
// entries) reads its last rate rather than memory beyond it.

// torch.optim.SGD: g = grad + wd * p; buf = g at the first update (clock[2] == first),
// else momentum * buf + (1 - dampening) * g; p -= lr * (g + momentum * buf (Nesterov), buf
// (momentum) or g).
template <typename T>
__global__ void sgd_flat(T* param, const T* grad, T* buf, const double* lr_of_step,
                         long long lr_steps, const long long* clock, double momentum, double dampening,
                         double weight_decay, int nesterov, long long first, long long size) {
  const T lr = (T)lr_of_step[min(clock[0], lr_steps - 1)];
  const int starting = clock[2] == first;
  const T mom = (T)momentum, damp = (T)(1.0 - dampening), wd = (T)weight_decay;
  GRID_STRIDE_LOOP(i, size) {
    const T p = param[i];
    T g = grad[i];
    if (weight_decay != 0.0) g = g + wd * p;
    if (momentum != 0.0) {
      T b;
      if (starting) b = g;
      else if (dampening == 0.0) b = buf[i] * mom + g;
      else b = buf[i] * mom + damp * g;
      buf[i] = b;
      g = nesterov ? g + mom * b : b;
    }
    param[i] = p - lr * g;
  }
}

// torch.optim.Adam / AdamW (no amsgrad); t = clock[2] + 1.
template <typename T>
__global__ void adam_flat(T* param, const T* grad, T* exp_avg, T* exp_avg_sq,
                          const double* lr_of_step, long long lr_steps,
                          const long long* clock, double beta1,
                          double beta2, double eps, double weight_decay, int decoupled,
                          long long size) {
  const double lr = lr_of_step[min(clock[0], lr_steps - 1)];
  const double t = (double)(clock[2] + 1);
  const T step_size = (T)(lr / (1.0 - pow(beta1, t)));
  const T bias2_sqrt = (T)sqrt(1.0 - pow(beta2, t));
  const T b1 = (T)beta1, b2 = (T)beta2, wd = (T)weight_decay;
  // 1 - beta and the decay factor in double, then rounded (as the reference's Python floats)
  const T c1 = (T)(1.0 - beta1), c2 = (T)(1.0 - beta2), decay = (T)(1.0 - lr * weight_decay);
  GRID_STRIDE_LOOP(i, size) {
    T p = param[i];
    T g = grad[i];
    if (weight_decay != 0.0) {
      if (decoupled) p = p * decay;
      else g = g + wd * p;
    }
    const T m = exp_avg[i] * b1 + c1 * g;
    const T v = exp_avg_sq[i] * b2 + c2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    T denom = sqrt(v) / bias2_sqrt + (T)eps;
    param[i] = p - (m / denom) * step_size;
  }
}

// ParameterEMA: average += (1 - d) * (param - average), d = min(decay, (1 + n) / (10 + n))
// with n = clock[3] updates done.
template <typename T>
__global__ void ema_flat(T* average, const T* param, const long long* clock, double decay,
                         long long size) {
  const double n = (double)clock[3];
  const T rate = (T)(1.0 - fmin(decay, (1.0 + n) / (10.0 + n)));
  GRID_STRIDE_LOOP(i, size) {
    const T a = average[i];
    average[i] = a + rate * (param[i] - a);
  }
}
