// LeCun's Euclidean RBF output layer (layers/rbf.py is the reference), on row-major arrays:
// x (N, F) the F6 outputs, centres (K, F), logits and grad_logits (N, K). One thread per
// output value; the sums run over features (forward) or classes (backward) in order.

// logits[r, j] = -sum_i (x[r, i] - centres[j, i])^2 (the reference's 2 x.c - |x|^2 - |c|^2,
// summed directly: the same value without the cancellation).
template <typename T>
__global__ void rbf_logits(const T* x, const T* centres, T* logits, long long n, int k,
                           int f) {
  GRID_STRIDE_LOOP(idx, n * k) {
    const T* row = x + (idx / k) * f;
    const T* centre = centres + (idx % k) * f;
    T sum = 0;
    for (int i = 0; i < f; ++i) {
      const T d = row[i] - centre[i];
      sum += d * d;
    }
    logits[idx] = -sum;
  }
}

// grad_x[r, i] = 2 (sum_j grad_logits[r, j] centres[j, i] - x[r, i] sum_j grad_logits[r, j]).
template <typename T>
__global__ void rbf_backward(const T* grad_logits, const T* x, const T* centres, T* grad_x,
                             long long n, int k, int f) {
  GRID_STRIDE_LOOP(idx, n * f) {
    const long long r = idx / f;
    const int i = idx % f;
    T pull = 0, total = 0;
    for (int j = 0; j < k; ++j) {
      const T g = grad_logits[r * k + j];
      pull += g * centres[(long long)j * f + i];
      total += g;
    }
    grad_x[idx] = T(2) * (pull - x[idx] * total);
  }
}
