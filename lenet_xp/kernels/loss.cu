// Softmax cross-entropy, forward and backward, the number of correct predictions and the
// epoch's running sums, in one launch of ONE block of LOSS_THREADS threads (the batch is a
// few hundred rows of 10 logits). Reference: functional/loss.py and train.train_epoch.
// Rows are split over the threads; the block then sums in a fixed tree (deterministic).
#define LOSS_THREADS 256

// logits (N, K) and grad_logits (N, K) with element strides (row, class): (sli, slk) and
// (sgi, sgk), so feature-major (K, N) arrays work as they are. labels (N,) int64.
//   grad_logits = (softmax(logits) - onehot(labels)) / N
//   batch_loss[0] = mean cross-entropy (a label outside [0, K) makes it NaN)
//   loss_sum[0] += batch_loss * N;  correct[0] += #(first argmax == label)   (running sums;
//   either may be null: not kept)
//   counters[i] += 1 for i < n_counters (the step counters of a captured step; may be 0)
// With with_rubbish, the softmax also runs over one more, constant logit `rubbish` that is
// never a label nor a prediction: LeCun's RBF loss (functional/loss.py's rbf_loss, rubbish =
// -j); grad_logits and the loss are then its.
template <typename T>
__global__ void softmax_cross_entropy(const T* logits, long long sli, long long slk,
                                      const long long* labels, T* grad_logits, long long sgi,
                                      long long sgk, int n, int k, int with_rubbish,
                                      T rubbish, T* batch_loss,
                                      double* loss_sum, long long* correct,
                                      long long* counters, int n_counters) {
  __shared__ double part_loss[LOSS_THREADS];
  __shared__ long long part_correct[LOSS_THREADS];
  const int tid = threadIdx.x;
  const T inv_n = T(1) / T(n);
  double my_loss = 0;
  long long my_correct = 0;
  for (int i = tid; i < n; i += blockDim.x) {
    const T* row = logits + i * sli;
    T top = row[0];
    int top_class = 0;
    for (int j = 1; j < k; ++j) {
      if (row[j * slk] > top) {  // first maximum, as argmax
        top = row[j * slk];
        top_class = j;
      }
    }
    const int prediction = top_class;  // the real classes' first maximum
    if (with_rubbish && rubbish > top) top = rubbish;  // the shift of the log-sum-exp
    T sum = 0;
    for (int j = 0; j < k; ++j) sum += exp(row[j * slk] - top);
    if (with_rubbish) sum += exp(rubbish - top);
    const T log_sum = log(sum);
    const long long label = labels[i];
    const bool valid = label >= 0 && label < k;
    for (int j = 0; j < k; ++j) {
      const T prob = exp(row[j * slk] - top - log_sum);
      grad_logits[i * sgi + j * sgk] = (prob - (j == label ? T(1) : T(0))) * inv_n;
    }
    my_loss += valid ? (double)(log_sum - (row[label * slk] - top)) : nan("");
    my_correct += (valid && prediction == label) ? 1 : 0;
  }
  part_loss[tid] = my_loss;
  part_correct[tid] = my_correct;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (tid < half) {
      part_loss[tid] += part_loss[tid + half];
      part_correct[tid] += part_correct[tid + half];
    }
    __syncthreads();
  }
  if (tid == 0) {
    batch_loss[0] = (T)(part_loss[0] / n);
    if (loss_sum) loss_sum[0] += part_loss[0];
    if (correct) correct[0] += part_correct[0];
    for (int c = 0; c < n_counters; ++c) counters[c] += 1;
  }
}
