// im2col and col2im for convolution as im2col + GEMM (lenet_xp/functional/conv.py is the
// reference). Layout: x_cols (C*KH*KW, OH*OW*N), row (c, i, j), column (oh, ow, n), batch
// innermost; col2im's output is stored (C, H, W, N), batch innermost.

// x (N, C, H, W) with element strides (sn, sc, sh, sw): any memory layout.
// Zero where the window reaches into the padding.
template <typename T>
__global__ void im2col(const T* x, T* x_cols, int n, int c, int h, int w, long long sn,
                       long long sc, long long sh, long long sw, int kh, int kw, int stride,
                       int pad, int oh, int ow) {
  const long long total = (long long)c * kh * kw * oh * ow * n;
  GRID_STRIDE_LOOP(idx, total) {
    long long rest = idx;
    const int in = rest % n; rest /= n;
    const int iow = rest % ow; rest /= ow;
    const int ioh = rest % oh; rest /= oh;
    const int j = rest % kw; rest /= kw;
    const int i = rest % kh;
    const int ic = rest / kh;
    const int y = ioh * stride - pad + i;
    const int x_ = iow * stride - pad + j;
    T value = 0;
    if (y >= 0 && y < h && x_ >= 0 && x_ < w) value = x[in * sn + ic * sc + y * sh + x_ * sw];
    x_cols[idx] = value;
  }
}

// The adjoint of im2col as a gather: each input pixel (c, y, x, n) sums the entries of the
// windows that cover it, offsets (i, j) in row-major order (the reference's order of adds).
template <typename T>
__global__ void col2im(const T* x_cols, T* grad_x, int n, int c, int h, int w, int kh, int kw,
                       int stride, int pad, int oh, int ow) {
  const long long total = (long long)c * h * w * n;
  GRID_STRIDE_LOOP(idx, total) {
    const Chwn p = chwn_at(idx, n, h, w);
    T sum = 0;
    for (int i = 0; i < kh; ++i) {
      const int ty = p.y + pad - i;
      if (ty < 0 || ty % stride != 0 || ty / stride >= oh) continue;
      for (int j = 0; j < kw; ++j) {
        const int tx = p.x + pad - j;
        if (tx < 0 || tx % stride != 0 || tx / stride >= ow) continue;
        const long long row = ((long long)p.c * kh + i) * kw + j;
        sum += x_cols[((row * oh + ty / stride) * ow + tx / stride) * n + p.n];
      }
    }
    grad_x[idx] = sum;
  }
}
