// Unmasked softmax attention for float32 on a CPU, as an XLA FFI custom call.
//
// Why: XLA:CPU runs FLUX's attention at 65-90 GFLOP/s on a 2-core AVX-512 machine, against
// about 200 for PyTorch's fused kernel; its batched small matmuls and its exp are both slow.
// This kernel keeps one block of queries' logits in L2 and does both matmuls with register-
// blocked outer products, using XLA's own intra-op thread pool (simd.h).
//
// Inputs (row-major): q (B, L, H, d), k_t (B, H, d, L) (keys pre-transposed by the caller so
// the logits kernel reads contiguous rows), v (B, L, H, d). Output: (B, L, H, d).
// Attribute: scale (float32), multiplied into the logits.
//
// Numerics: logits and softmax in float32; each row's max is subtracted before exp; the
// normalisation by the row sum is applied to the output (R x d) instead of the probabilities
// (R x L), which reorders one rounding. exp is a degree-7 polynomial after range reduction:
// at most 7.9e-8 relative error over [-87, 0], the range softmax uses (libm's expf: 6.0e-8).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "simd.h"

namespace ffi = xla::ffi;
using namespace fluxjax_simd;

namespace {

inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < W; ++i) m = std::max(m, x[i]);
  return m;
}
inline float hsum(vf x) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += x[i];
  return s;
}

// exp(x) for x <= 0 (arguments below -87 give ~0, as they should after max subtraction).
inline vf vexp(vf x) {
  const vf lo = splat(-87.0f);
  x = x < lo ? lo : x;
  const vf log2e = splat(1.44269504088896341f);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * log2e + magic) - magic;
  // ln 2 split so n * ln2_hi is exact for |n| < 2^8.
  vf r = x - n * splat(0.693145751953125f);
  r = r - n * splat(1.428606765330187e-06f);
  vf p = splat(1.f / 5040.f);
  p = p * r + splat(1.f / 720.f);
  p = p * r + splat(1.f / 120.f);
  p = p * r + splat(1.f / 24.f);
  p = p * r + splat(1.f / 6.f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * reinterpret_cast<const vf&>(e);
}

inline float sexp(float x) { return std::exp(std::max(x, -87.0f)); }

struct Shape {
  int64_t batch, len, heads, dim;
};

// S[r, j:j+2W] = scale * sum_c Q[r, c] * panel[c, :], for MR rows. Q rows are `q_stride`
// apart; `panel` is Kt[:, j:j+2W] packed (dim x 2W); S rows are `len` apart.
template <int MR>
inline void logits_tile(const float* q, int64_t q_stride, const float* panel, int64_t dim, float scale, float* s,
                        int64_t len) {
  vf acc[MR][2] = {};
  for (int64_t c = 0; c < dim; ++c) {
    const vf b0 = load(panel + c * 2 * W), b1 = load(panel + c * 2 * W + W);
    for (int r = 0; r < MR; ++r) {
      const vf a = splat(q[r * q_stride + c]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store(s + r * len, acc[r][0] * scale);
    store(s + r * len + W, acc[r][1] * scale);
  }
}

// S = scale * Q Kt for `rows` query rows; Kt rows are `len` apart, S rows too. Each strip of
// 2W key columns is first copied into `panel` (dim x 2W floats): read in place, the strip's
// rows sit a multiple of 4 KiB apart for common lengths and evict each other from L1.
void logits(const float* q, int64_t q_stride, int64_t rows, const float* kt, int64_t len, int64_t dim, float scale,
            float* s, float* panel) {
  const int64_t full = len / (2 * W) * (2 * W);
  for (int64_t j = 0; j < full; j += 2 * W) {
    for (int64_t c = 0; c < dim; ++c) {
      store(panel + c * 2 * W, load(kt + c * len + j));
      store(panel + c * 2 * W + W, load(kt + c * len + j + W));
    }
    int64_t r = 0;
    for (; r + 8 <= rows; r += 8) logits_tile<8>(q + r * q_stride, q_stride, panel, dim, scale, s + r * len + j, len);
    for (; r < rows; ++r) logits_tile<1>(q + r * q_stride, q_stride, panel, dim, scale, s + r * len + j, len);
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = full; j < len; ++j) {
      float acc = 0.f;
      for (int64_t c = 0; c < dim; ++c) acc += q[r * q_stride + c] * kt[c * len + j];
      s[r * len + j] = acc * scale;
    }
  }
}

// Turns each row of S into exp(S - max) in place; returns 1 / sum per row in inv_sum.
void softmax_rows(float* s, int64_t rows, int64_t len, float* inv_sum) {
  const int64_t full = len / W * W;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * len;
    float m = -INFINITY;
    if (full) {
      vf vm = load(row);
      for (int64_t j = W; j < full; j += W) {
        const vf x = load(row + j);
        vm = x > vm ? x : vm;
      }
      m = hmax(vm);
    }
    for (int64_t j = full; j < len; ++j) m = std::max(m, row[j]);
    vf vs = {};
    const vf vmax = splat(m);
    for (int64_t j = 0; j < full; j += W) {
      const vf e = vexp(load(row + j) - vmax);
      store(row + j, e);
      vs += e;
    }
    float sum = hsum(vs);
    for (int64_t j = full; j < len; ++j) {
      row[j] = sexp(row[j] - m);
      sum += row[j];
    }
    inv_sum[r] = 1.f / sum;
  }
}

// O[r, :] (+)= sum_j P[r, j] * V[j, :] over keys [0, keys), for MR rows and NV vectors of
// columns; the first key block starts from zero, later ones add to O.
template <int MR, int NV>
inline void output_tile(const float* p, int64_t p_stride, int64_t keys, const float* v, int64_t v_stride, bool first,
                        float* o, int64_t o_stride) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = first ? vf{} : load(o + r * o_stride + n * W);
  for (int64_t j = 0; j < keys; ++j) {
    vf b[NV];
    for (int n = 0; n < NV; ++n) b[n] = load(v + j * v_stride + n * W);
    for (int r = 0; r < MR; ++r) {
      const vf a = splat(p[r * p_stride + j]);
      for (int n = 0; n < NV; ++n) acc[r][n] += a * b[n];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) store(o + r * o_stride + n * W, acc[r][n]);
}

template <int NV, int MR>
void output_columns(const float* p, int64_t p_stride, int64_t rows, int64_t keys, const float* v, int64_t v_stride,
                    bool first, float* o, int64_t o_stride) {
  int64_t r = 0;
  for (; r + MR <= rows; r += MR)
    output_tile<MR, NV>(p + r * p_stride, p_stride, keys, v, v_stride, first, o + r * o_stride, o_stride);
  for (; r < rows; ++r) output_tile<1, NV>(p + r * p_stride, p_stride, keys, v, v_stride, first, o + r * o_stride, o_stride);
}

// Keys per pass of the output product. The pass's V rows are copied into `panel`
// (KEY_BLOCK x d, contiguous) where they stay in L1 while every row tile of P goes over them;
// in place they would sit H*d floats apart, a stride that maps them onto a few L1 sets.
constexpr int64_t KEY_BLOCK = 128;

// O = diag(inv_sum) P V for `rows` rows; P rows are `len` apart, V and O rows `*_stride` apart.
void output(const float* p, int64_t rows, int64_t len, const float* v, int64_t v_stride, int64_t dim,
            const float* inv_sum, float* o, int64_t o_stride, float* panel) {
  const int64_t vector_dim = dim / W * W;
  for (int64_t j0 = 0; j0 < len && vector_dim; j0 += KEY_BLOCK) {
    const int64_t keys = std::min(KEY_BLOCK, len - j0);
    for (int64_t j = 0; j < keys; ++j)
      std::memcpy(panel + j * vector_dim, v + (j0 + j) * v_stride, vector_dim * sizeof(float));
    const float* pj = p + j0;
    const bool first = j0 == 0;
    int64_t c = 0;
    // 24 accumulators per tile: 6 rows x 4 vectors, then 12 x 2, 24 x 1 for what is left.
    for (; c + 4 * W <= vector_dim; c += 4 * W) output_columns<4, 6>(pj, len, rows, keys, panel + c, vector_dim, first, o + c, o_stride);
    for (; c + 2 * W <= vector_dim; c += 2 * W) output_columns<2, 12>(pj, len, rows, keys, panel + c, vector_dim, first, o + c, o_stride);
    for (; c + W <= vector_dim; c += W) output_columns<1, 24>(pj, len, rows, keys, panel + c, vector_dim, first, o + c, o_stride);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* row = o + r * o_stride;
    for (int64_t c = vector_dim; c < dim; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < len; ++j) acc += p[r * len + j] * v[j * v_stride + c];
      row[c] = acc;
    }
    for (int64_t c = 0; c < dim; ++c) row[c] *= inv_sum[r];
  }
}

// Query rows per work item: its logits block (rows x len floats) stays within 512 KiB of L2.
int64_t rows_per_block(int64_t len) {
  int64_t rows = (128 * 1024) / std::max<int64_t>(len, 1);
  rows = std::max<int64_t>(8, std::min<int64_t>(64, rows / 8 * 8));
  return rows;
}

void attend_block(const Shape& s, const float* q, const float* kt, const float* v, float* o, float scale,
                  int64_t item, int64_t rows_per, std::vector<float>& scratch) {
  const int64_t blocks = (s.len + rows_per - 1) / rows_per;
  const int64_t b = item / (s.heads * blocks), h = item / blocks % s.heads, blk = item % blocks;
  const int64_t row0 = blk * rows_per, rows = std::min(rows_per, s.len - row0);
  const int64_t stride = s.heads * s.dim;  // between consecutive positions of one head in q, v, o
  scratch.resize(rows_per * s.len + rows_per + s.dim * std::max<int64_t>(2 * W, KEY_BLOCK));
  float* logit = scratch.data();
  float* inv_sum = logit + rows_per * s.len;
  float* panel = inv_sum + rows_per;
  const float* q0 = q + (b * s.len + row0) * stride + h * s.dim;
  const float* kt0 = kt + (b * s.heads + h) * s.dim * s.len;
  const float* v0 = v + b * s.len * stride + h * s.dim;
  float* o0 = o + (b * s.len + row0) * stride + h * s.dim;
  logits(q0, stride, rows, kt0, s.len, s.dim, scale, logit, panel);
  softmax_rows(logit, rows, s.len, inv_sum);
  output(logit, rows, s.len, v0, stride, s.dim, inv_sum, o0, stride, panel);
}

// Named so the handler binding below has no commas inside a macro argument.
using Tensor4 = ffi::Buffer<ffi::F32, 4>;
using Result4 = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error Attention(ffi::ThreadPool pool, Tensor4 q, Tensor4 kt, Tensor4 v, Result4 out, float scale) {
  const auto d = q.dimensions();
  const Shape s{d[0], d[1], d[2], d[3]};
  const auto dk = kt.dimensions(), dv = v.dimensions();
  if (dk[0] != s.batch || dk[1] != s.heads || dk[2] != s.dim || dk[3] != s.len)
    return ffi::Error::InvalidArgument("fluxjax_cpu_attention: k_t must be (B, H, d, L) for q (B, L, H, d)");
  for (int i = 0; i < 4; ++i)
    if (dv[i] != d[i]) return ffi::Error::InvalidArgument("fluxjax_cpu_attention: v must have q's shape");
  const int64_t rows_per = rows_per_block(s.len);
  const int64_t items = s.batch * s.heads * ((s.len + rows_per - 1) / rows_per);
  const float *qp = q.typed_data(), *kp = kt.typed_data(), *vp = v.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, items, [=](int64_t item, std::vector<float>& scratch) {
    attend_block(s, qp, kp, vp, op, scale, item, rows_per, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FluxjaxCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Tensor4>()
                                  .Arg<Tensor4>()
                                  .Arg<Tensor4>()
                                  .Ret<Tensor4>()
                                  .Attr<float>("scale"));
