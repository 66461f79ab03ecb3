// The batch fetch of a training step as one gather: image order[start + b] of the
// device-resident training set, translated by its random shift, and its label.
// Reference: data.DeviceSplit.batches and data.shift_images.

// images (M, 1, H, W) contiguous, labels (M,) int64, order (count,) int64 (this epoch's
// permutation, or its tail from a rank's slice's start), shifts (2, M) int64 (down, right;
// may be null: no shift). The batch's first position in order is batch_index[0] * batch (a
// device counter, so a captured step fetches the next batch at each replay). x (rows, 1, H,
// W), y (rows,): the batch's first rows; rows past order's end are not written.
template <typename T>
__global__ void gather_shift(const T* images, const long long* labels, const long long* order,
                             const long long* shifts, const long long* batch_index, int batch,
                             int rows, int count, int m, int h, int w, T fill, T* x,
                             long long* y) {
  const long long start = batch_index[0] * batch;
  const long long total = (long long)rows * h * w;
  GRID_STRIDE_LOOP(idx, total) {
    const int b = idx / ((long long)h * w);
    const int pixel = idx % ((long long)h * w);
    if (start + b >= count) continue;
    const long long src = order[start + b];
    int row = pixel / w, col = pixel % w;
    if (shifts) {
      row -= (int)shifts[src];
      col -= (int)shifts[m + src];
    }
    const bool inside = row >= 0 && row < h && col >= 0 && col < w;
    x[idx] = inside ? images[src * h * w + row * w + col] : fill;
    if (pixel == 0) y[b] = labels[src];
  }
}
