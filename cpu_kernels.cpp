// The CPU twin of cuda_kernels.cu: the same recurrences with the same function names, arguments and results, so
// one autograd Function per recurrence (rfwp.py) serves both devices; and, on the CPU only (the GPU runs ode_fwp.py's
// PyTorch form), the continuous-time delta rule of ode_fwp.py (ct_linear_rule_*, at the end). JIT-loaded with
// torch.utils.cpp_extension.load (a C++ compiler and ninja). float32 and float64 inputs; the state and every sum in
// the input's precision.
//
//   sum rule    W_t = W_{t-1} + v_t k_t^T;                             y_t = W_t q_t
//   delta rule  W_t = W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T;     y_t = W_t q_t
//   gated       W_t = alpha_t W_{t-1} + beta_t (v_t - alpha_t W_{t-1} k_t) k_t^T, alpha_t = exp(g_t);  y_t = W_t q_t
//   Delta RNN   R_t by the delta rule;                                 y_t = z_t + R_t softmax(y_{t-1})
//   Delta LSTM  per gate g in (i, u, o): R^g by the delta rule; a^g = z^g_t + R^g_t softmax(h_{t-1});
//               c_t = sigmoid(a^i) a^u + (1 - sigmoid(a^i)) c_{t-1};  h_t = sigmoid(a^o) c_t
//   RDN         s = tanh(y_{t-1}); q = softmax(q_t + R_q s), k = softmax(k_t + R_k s), v = v_t + R_v s,
//               beta = sigmoid(b_t + r_b . s); W by the delta rule;   y_t = W_t q
// (Irie et al. 2021, eq. 4-7, 17-32.) One task per (b, h), spread over threads by at::parallel_for; each task walks
// time holding its d x d matrices in a local buffer, the forward transposed (write_and_read_t), the backward by rows.
// The common head widths (16, 32, 64) are compile-time constants, so the loops over a row unroll and vectorize;
// any other d_head runs the generic code. Any B H and T (T = 1 for RL), the state in and out.
//
// Backward, as on the GPU: no matrix is stored per step. The forward saves v̄_t = W_{t-1} k_t (and, for the RDN, the
// squashed q, k, the value and beta); the backward starts from the final matrices and undoes each write exactly as
// written, W_{t-1} = W_t - beta_t (v_t - v̄_t) k_t^T, while it carries dL/dW back. For a write W_t = W_{t-1} + u k^T
// with u = beta (v - v̄), v̄ = W_{t-1} k, and dM = dL/dW_t, row i of dM gives
//   du_i = dM_i . k,  dv_i = beta du_i,  dbeta += du_i (v_i - v̄_i),  dk += u_i dM_i - beta du_i W_{t-1,i},
//   dL/dW_{t-1,i} = dM_i - beta du_i k.
// The gated rule's backward cannot undo a write (that would divide by alpha_t); it recomputes from saved states
// instead (its notes below).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// ---- Vector helpers on raw rows of length n (N > 0: of the compile-time length N). Their arguments never overlap,
// which `omp simd` tells the compiler, so it vectorizes them (dot: in partial sums, added in another order than one
// running sum; the results differ from the plain sum's by rounding only).
template <int N, typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  if constexpr (N > 0) n = N;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

template <int N, typename T>
inline void axpy(T* y, T a, const T* x, int64_t n) {  // y += a x
  if constexpr (N > 0) n = N;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

template <int N, typename T>
inline void axpby(T* y, T a, T b, const T* x, int64_t n) {  // y = a y + b x
  if constexpr (N > 0) n = N;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = a * y[j] + b * x[j];
}

// exp(x) - 1 and exp(x) for one entry, in arithmetic only, so that a loop over a row vectorizes (std::exp and
// std::tanh are scalar library calls, which took a third of the recurrent kernels' time): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite), expm1(r)
// by its Taylor polynomial (to degree 7 for float, 13 for double: the remainder is below half an ulp), then
// expm1(x) = 2^n expm1(r) + (2^n - 1), exact in its small-|x| range (n = 0), where exp(x) - 1 would cancel. x is
// clamped to where 2^n is a normal number (NaN passes through: it compares false).
template <typename T>
struct ExpConsts;
template <>
struct ExpConsts<float> {
  using Bits = int32_t;
  static constexpr float lo = -87.0f, hi = 88.0f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float round = 12582912.0f;  // 1.5 2^23: adding it rounds to an integer
  static constexpr int degree = 7, mantissa = 23, bias = 127;
};
template <>
struct ExpConsts<double> {
  using Bits = int64_t;
  static constexpr double lo = -708.0, hi = 709.0, ln2_hi = 0.693145751953125, ln2_lo = 1.42860682030941723e-6;
  static constexpr double round = 6755399441055744.0;  // 1.5 2^52
  static constexpr int degree = 13, mantissa = 52, bias = 1023;
};

template <typename T>
inline void expm1_parts(T x, T& scale, T& em1_r) {  // exp(x) = scale (1 + em1_r), scale = 2^n
  using C = ExpConsts<T>;
  x = x < C::lo ? C::lo : x;
  x = x > C::hi ? C::hi : x;
  const T n = (x * T(1.4426950408889634) + C::round) - C::round;  // x / ln2 to the nearest integer
  const T r = (x - n * C::ln2_hi) - n * C::ln2_lo;
  T p = T(1);
  for (int i = C::degree; i >= 2; --i) p = T(1) + p * (r * (T(1) / T(i)));  // 1 + r/2 (1 + r/3 (...))
  em1_r = p * r;
  const typename C::Bits e = (static_cast<typename C::Bits>(n) + C::bias) << C::mantissa;
  scale = __builtin_bit_cast(T, e);
}

template <typename T>
inline T fast_exp(T x) {
  T scale, em1;
  expm1_parts(x, scale, em1);
  return scale + scale * em1;
}

template <typename T>
inline T fast_tanh(T x) {  // tanh |x| = -expm1(-2|x|) / (2 + expm1(-2|x|)), the sign of x
  T scale, em1;
  expm1_parts(-2 * std::fabs(x), scale, em1);
  const T u = scale * em1 + (scale - 1);
  return std::copysign(-u / (2 + u), x);
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + fast_exp(-x)); }

template <int N, typename T>
inline void sigmoid_row(const T* x, T* out, int64_t n) {
  if constexpr (N > 0) n = N;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = sigmoid(x[j]);
}

template <int N, typename T>
inline void tanh_row(const T* x, T* out, int64_t n) {
  if constexpr (N > 0) n = N;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = fast_tanh(x[j]);
}

template <int N, typename T>
inline void softmax(const T* x, T* p, int64_t n) {
  if constexpr (N > 0) n = N;
  T m = x[0], s = 0;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += p[j] = fast_exp(x[j] - m);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] /= s;
}

// p = softmax(x), dp = dL/dp -> dL/dx = p (dp - p . dp)
template <int N, typename T>
inline void softmax_backward(const T* p, const T* dp, T* dx, int64_t n) {
  if constexpr (N > 0) n = N;
  const T s = dot<N>(p, dp, n);
  for (int64_t j = 0; j < n; ++j) dx[j] = p[j] * (dp[j] - s);
}

// The l2 map (qk_map l2): out = scale silu(x) / |silu(x)| (|.| at least 1e-12, as F.normalize)
template <int N, typename T>
inline void l2_map(const T* x, T* out, T scale, int64_t n) {
  if constexpr (N > 0) n = N;
  T s = 0;
  for (int64_t j = 0; j < n; ++j) s += (out[j] = x[j] * sigmoid(x[j])) * out[j];
  const T r = scale / std::max(std::sqrt(s), T(1e-12));
  for (int64_t j = 0; j < n; ++j) out[j] *= r;
}

// x, dout = dL/dout -> dL/dx: with f = silu(x), n = f / |f|: dL/df = scale (dout - n (n . dout)) / |f|, times silu'(x)
template <int N, typename T>
inline void l2_map_backward(const T* x, const T* dout, T* dx, T scale, int64_t n) {
  if constexpr (N > 0) n = N;
  T s = 0, nd = 0;
  for (int64_t j = 0; j < n; ++j) s += x[j] * sigmoid(x[j]) * x[j] * sigmoid(x[j]);
  const T r = std::max(std::sqrt(s), T(1e-12));
  for (int64_t j = 0; j < n; ++j) nd += x[j] * sigmoid(x[j]) / r * dout[j];
  for (int64_t j = 0; j < n; ++j) {
    const T sg = sigmoid(x[j]);
    dx[j] = scale * (dout[j] - x[j] * sg / r * nd) / r * sg * (1 + x[j] * (1 - sg));
  }
}

// Its backward for row i, given Mi = row i of M_t and dMi = of dL/dM_t: undoes the write (Mi <- M_{t-1,i},
// dMi <- dL/dM_{t-1,i}), returns dv_i, adds this row's part of dL/dk to dk and of dL/dbeta to dbeta.
template <int N, typename T>
inline T delta_write_row_backward(T* Mi, T* dMi, const T* k, T v_i, T v_bar, T beta, T* dk, T& dbeta, int64_t n) {
  if constexpr (N > 0) n = N;
  const T u = beta * (v_i - v_bar), du = dot<N>(dMi, k, n);
  axpy<N>(dk, u, dMi, n);
  axpy<N>(Mi, -u, k, n);            // M_{t-1}
  axpy<N>(dMi, -beta * du, k, n);   // through v̄ = M_{t-1} k
  axpy<N>(dk, -beta * du, Mi, n);
  dbeta += du * (v_i - v_bar);
  return beta * du;
}

// The forwards hold each head's matrix transposed, S = M^T (row j of S is column j of M, of length n = d_v), so that
// every product is a sum of rows, which vectorizes with no sum across a row: v̄ = M k = sum_j k_j S_j, the write
// S_j += k_j u, and the read M q = sum_j q_j S_j. One delta-rule write (delta false: the sum rule, u = v) and the read
// of the written matrix with q: out += M_t q; v̄ and u (n) are outputs too.
template <int N, typename T>
inline void write_and_read_t(T* S, const T* k, const T* v, T beta, bool delta, const T* q, T* v_bar, T* u, T* out,
                             int64_t d_k, int64_t n) {
  if constexpr (N > 0) n = N;
  if (delta) {
    std::fill(v_bar, v_bar + n, T(0));
    for (int64_t j = 0; j < d_k; ++j) axpy<N>(v_bar, k[j], S + j * n, n);
    for (int64_t i = 0; i < n; ++i) u[i] = beta * (v[i] - v_bar[i]);
  } else {
    std::copy(v, v + n, u);
  }
  for (int64_t j = 0; j < d_k; ++j) {
    axpy<N>(S + j * n, k[j], u, n);
    axpy<N>(out, q[j], S + j * n, n);
  }
}

// The gated rule's write and read, S = M^T as above: v̄ = alpha M k, u = beta (v - v̄), S_j <- alpha S_j + k_j u (the
// decay and the write in one pass over S), out += M_t q.
template <int N, typename T>
inline void gated_write_and_read_t(T* S, const T* k, const T* v, T beta, T alpha, const T* q, T* v_bar, T* u, T* out,
                                   int64_t d_k, int64_t n) {
  if constexpr (N > 0) n = N;
  std::fill(v_bar, v_bar + n, T(0));
  for (int64_t j = 0; j < d_k; ++j) axpy<N>(v_bar, k[j], S + j * n, n);
  for (int64_t i = 0; i < n; ++i) u[i] = beta * (v[i] - alpha * v_bar[i]);
  for (int64_t j = 0; j < d_k; ++j) {
    axpby<N>(S + j * n, alpha, k[j], u, n);
    axpy<N>(out, q[j], S + j * n, n);
  }
}

// out += M x with S = M^T (d_k rows of length n)
template <int N, typename T>
inline void mat_vec_t(const T* S, const T* x, T* out, int64_t d_k, int64_t n) {
  if constexpr (N > 0) n = N;
  for (int64_t j = 0; j < d_k; ++j) axpy<N>(out, x[j], S + j * n, n);
}

// dst (cols x rows) = src (rows x cols) transposed
template <typename T>
inline void transpose(const T* src, T* dst, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

// ---- Checks and outputs.
void check_seq(const at::Tensor& x, at::IntArrayRef shape, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.device().is_cpu() && x.sizes() == shape, "FWP CPU kernel: ", name, " must be a CPU tensor of shape ",
              shape, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "FWP CPU kernel: ", name, " has another dtype");
}

void check_state(const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.sizes() == shape, "FWP CPU kernel: ", name, " must be a CPU tensor of shape ",
              shape, ", got ", x.sizes());
}

void check_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "FWP CPU kernel: float32 or float64 inputs, got ", x.scalar_type());
}

// a state, a saved vector or a gradient in the inputs' dtype, contiguous
at::Tensor as(const at::Tensor& x, const at::Tensor& like) { return x.to(like.scalar_type()).contiguous(); }

at::Tensor zeros_or(const at::Tensor& x, const at::Tensor& shape_of, const at::Tensor& like) {
  return x.defined() && x.numel() > 0 ? as(x, like) : at::zeros_like(shape_of);
}

template <typename T>
T* ptr(const at::Tensor& x) { return x.defined() && x.numel() > 0 ? x.data_ptr<T>() : nullptr; }

// f(w) with w a compile-time width N for the common head sizes (0: any other, read at run time), so that the loops
// over a row unroll and vectorize
template <typename F>
void dispatch_width(int64_t d, F&& f) {
  switch (d) {
    case 16: return f(std::integral_constant<int, 16>());
    case 32: return f(std::integral_constant<int, 32>());
    case 64: return f(std::integral_constant<int, 64>());
    default: return f(std::integral_constant<int, 0>());
  }
}

// f(bh) for every (b, h), a few per thread
template <typename F>
void for_each_head(int64_t BH, F&& f) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) f(bh);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The sum and delta rules. q, k (B, H, T, d_k), v (B, H, T, d_v), beta (B, H, T) (delta) or empty, W0 (B, H, d_v, d_k)
// or empty -> y (B, H, T, d_v), W_T, v̄ (B, H, T, d_v; delta rule; empty for the sum rule).
std::vector<at::Tensor> fast_weight_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor W0,
                                            bool delta) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d_k = q.size(3), d_v = v.size(3);
  check_dtype(q);
  check_seq(k, q.sizes(), "k", q), check_seq(v, {B, H, T, d_v}, "v", q);
  if (delta) check_seq(beta, {B, H, T}, "beta", q);
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = delta ? beta.contiguous() : beta;
  auto W = W0.defined() && W0.numel() > 0 ? as(W0, q).clone() : at::zeros({B, H, d_v, d_k}, q.options());
  check_state(W, {B, H, d_v, d_k}, "W0");
  auto y = at::empty_like(v);
  auto v_bar = at::empty(delta ? v.sizes().vec() : std::vector<int64_t>{0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fast_weight_forward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                   *bp = ptr<scalar_t>(beta);
    scalar_t *yp = y.data_ptr<scalar_t>(), *Wp = W.data_ptr<scalar_t>(), *vbp = ptr<scalar_t>(v_bar);
    dispatch_width(d_v, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        std::vector<scalar_t> S(d_k * d_v), vb(d_v), u(d_v);
        transpose(Wp + bh * d_v * d_k, S.data(), d_v, d_k);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t ok = (bh * T + t) * d_k, ov = (bh * T + t) * d_v;
          std::fill(yp + ov, yp + ov + d_v, scalar_t(0));
          write_and_read_t<N>(S.data(), kp + ok, vp + ov, delta ? bp[bh * T + t] : scalar_t(1), delta, qp + ok,
                              vb.data(), u.data(), yp + ov, d_k, d_v);
          if (delta) std::copy(vb.begin(), vb.end(), vbp + ov);
        }
        transpose(S.data(), Wp + bh * d_v * d_k, d_k, d_v);
      });
    });
  });
  return {y, W, v_bar};
}

// The saved tensors, dy (B, H, T, d_v), dW (dL/dW_T, or empty) -> dq, dk, dv, dbeta (empty for the sum rule), dW0.
std::vector<at::Tensor> fast_weight_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta,
                                             at::Tensor v_bar, at::Tensor W, at::Tensor dy, at::Tensor dW,
                                             bool delta) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d_k = q.size(3), d_v = v.size(3);
  check_dtype(q);
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = delta ? beta.contiguous() : beta;
  auto M = as(W, q).clone(), dM = zeros_or(dW, M, q);
  dy = as(dy, q), v_bar = delta ? as(v_bar, q) : v_bar;
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dbeta = at::empty(delta ? std::vector<int64_t>{B, H, T} : std::vector<int64_t>{0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fast_weight_backward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                   *bp = ptr<scalar_t>(beta), *vbp = ptr<scalar_t>(v_bar), *dyp = dy.data_ptr<scalar_t>();
    scalar_t *Mp = M.data_ptr<scalar_t>(), *dMp = dM.data_ptr<scalar_t>(), *dqp = dq.data_ptr<scalar_t>(),
             *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>(), *dbp = ptr<scalar_t>(dbeta);
    dispatch_width(d_k, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        scalar_t *Mh = Mp + bh * d_v * d_k, *dMh = dMp + bh * d_v * d_k;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t ok = (bh * T + t) * d_k, ov = (bh * T + t) * d_v;
          scalar_t *gq = dqp + ok, *gk = dkp + ok, db = 0;
          std::fill(gq, gq + d_k, scalar_t(0));
          std::fill(gk, gk + d_k, scalar_t(0));
          for (int64_t i = 0; i < d_v; ++i) {
            scalar_t *Mi = Mh + i * d_k, *dMi = dMh + i * d_k;
            const scalar_t gy = dyp[ov + i];
            axpy<N>(gq, gy, Mi, d_k);  // y_t = W_t q_t
            axpy<N>(dMi, gy, qp + ok, d_k);
            if (delta) {
              dvp[ov + i] = delta_write_row_backward<N>(Mi, dMi, kp + ok, vp[ov + i], vbp[ov + i], bp[bh * T + t], gk,
                                                        db, d_k);
            } else {  // W_t = W_{t-1} + v k^T
              dvp[ov + i] = dot<N>(dMi, kp + ok, d_k);
              axpy<N>(gk, vp[ov + i], dMi, d_k);
              axpy<N>(Mi, -vp[ov + i], kp + ok, d_k);
            }
          }
          if (delta) dbp[bh * T + t] = db;
        }
      });
    });
  });
  return {dq, dk, dv, dbeta, dM};
}

// ---------------------------------------------------------------------------------------------
// The gated delta rule (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", arXiv 2412.06464; delta_net.py --gate):
//   W_t = alpha_t W_{t-1} + beta_t (v_t - alpha_t W_{t-1} k_t) k_t^T,  alpha_t = exp(g_t);   y_t = W_t q_t
// Undoing a write as above would divide by alpha_t, which underflows as alpha_t -> 0. So the forward saves W at the
// start of every segment of kGatedSegment steps, and the backward walks the segments in reverse: from a segment's
// saved start it recomputes the segment's states (by rows, W_{t,i} = alpha W_{t-1,i} + u_i k), then walks them back.
// Per step, with a_i = W_{t-1,i} . k, v̄_i = alpha a_i, u_i = beta (v_i - v̄_i) and dM = dL/dW_t (the read's dy_i q
// added), row i gives
//   du_i = dM_i . k,  dv_i = beta du_i,  dbeta += du_i (v_i - v̄_i),  dk += u_i dM_i - alpha beta du_i W_{t-1,i},
//   dg += alpha (dM_i . W_{t-1,i} - beta du_i a_i),  dL/dW_{t-1,i} = alpha (dM_i - beta du_i k),
// and dq = sum_i dy_i W_{t,i}. Nothing divides by alpha: alpha_t = 0 (g_t = -inf) is exact. Memory: the saved states,
// d_k / kGatedSegment times the size of v (the plain rule's v̄ is the size of v), and per thread kGatedSegment + 1
// matrices while a segment is walked back.
constexpr int64_t kGatedSegment = 32;

// q, k (B, H, T, d_k), v (B, H, T, d_v), beta, g (B, H, T), W0 (B, H, d_v, d_k) or empty -> y (B, H, T, d_v), W_T and
// the state at the start of each segment, W_{s kGatedSegment - 1} (B, H, ceil(T / kGatedSegment), d_v, d_k).
std::vector<at::Tensor> gated_delta_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor g,
                                            at::Tensor W0) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d_k = q.size(3), d_v = v.size(3);
  const int64_t n_seg = (T + kGatedSegment - 1) / kGatedSegment;
  check_dtype(q);
  check_seq(k, q.sizes(), "k", q), check_seq(v, {B, H, T, d_v}, "v", q), check_seq(beta, {B, H, T}, "beta", q);
  check_seq(g, {B, H, T}, "g", q);
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous(), g = g.contiguous();
  auto W = W0.defined() && W0.numel() > 0 ? as(W0, q).clone() : at::zeros({B, H, d_v, d_k}, q.options());
  check_state(W, {B, H, d_v, d_k}, "W0");
  auto y = at::empty_like(v), W_seg = at::empty({B, H, n_seg, d_v, d_k}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gated_delta_forward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                   *bp = beta.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *Wp = W.data_ptr<scalar_t>(), *Wsp = W_seg.data_ptr<scalar_t>();
    dispatch_width(d_v, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        std::vector<scalar_t> S(d_k * d_v), vb(d_v), u(d_v);
        transpose(Wp + bh * d_v * d_k, S.data(), d_v, d_k);
        for (int64_t t = 0; t < T; ++t) {
          if (t % kGatedSegment == 0) transpose(S.data(), Wsp + (bh * n_seg + t / kGatedSegment) * d_v * d_k, d_k, d_v);
          const int64_t ok = (bh * T + t) * d_k, ov = (bh * T + t) * d_v;
          std::fill(yp + ov, yp + ov + d_v, scalar_t(0));
          gated_write_and_read_t<N>(S.data(), kp + ok, vp + ov, bp[bh * T + t], std::exp(gp[bh * T + t]), qp + ok,
                                    vb.data(), u.data(), yp + ov, d_k, d_v);
        }
        transpose(S.data(), Wp + bh * d_v * d_k, d_k, d_v);
      });
    });
  });
  return {y, W, W_seg};
}

// The inputs, the saved segment starts, dy (B, H, T, d_v) and dW (dL/dW_T, or empty) -> dq, dk, dv, dbeta, dg, dW0.
std::vector<at::Tensor> gated_delta_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor g,
                                             at::Tensor W_seg, at::Tensor dy, at::Tensor dW) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d_k = q.size(3), d_v = v.size(3);
  const int64_t n_seg = (T + kGatedSegment - 1) / kGatedSegment;
  check_dtype(q);
  check_seq(W_seg, {B, H, n_seg, d_v, d_k}, "the saved states", q);
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous(), g = g.contiguous();
  W_seg = W_seg.contiguous(), dy = as(dy, q);
  auto dM = zeros_or(dW, at::empty({B, H, d_v, d_k}, q.options()), q).clone();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v), dbeta = at::empty_like(beta);
  auto dg = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gated_delta_backward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                   *bp = beta.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(), *Wsp = W_seg.data_ptr<scalar_t>(),
                   *dyp = dy.data_ptr<scalar_t>();
    scalar_t *dMp = dM.data_ptr<scalar_t>(), *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(),
             *dvp = dv.data_ptr<scalar_t>(), *dbp = dbeta.data_ptr<scalar_t>(), *dgp = dg.data_ptr<scalar_t>();
    const int64_t DD = d_v * d_k;
    dispatch_width(d_k, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        std::vector<scalar_t> Ws((kGatedSegment + 1) * DD);  // W_{t0 - 1}, W_{t0}, ..., W_{t1 - 1}
        scalar_t* dMh = dMp + bh * DD;
        for (int64_t seg = n_seg - 1; seg >= 0; --seg) {
          const int64_t t0 = seg * kGatedSegment, t1 = std::min(T, t0 + kGatedSegment);
          std::copy(Wsp + (bh * n_seg + seg) * DD, Wsp + (bh * n_seg + seg + 1) * DD, Ws.begin());
          for (int64_t t = t0; t < t1; ++t) {  // recompute the segment's states
            const scalar_t *kt = kp + (bh * T + t) * d_k, *vt = vp + (bh * T + t) * d_v, b = bp[bh * T + t];
            const scalar_t alpha = std::exp(gp[bh * T + t]);
            const scalar_t* prev = Ws.data() + (t - t0) * DD;
            scalar_t* next = Ws.data() + (t - t0 + 1) * DD;
            for (int64_t i = 0; i < d_v; ++i) {
              const scalar_t *Pi = prev + i * d_k, ui = b * (vt[i] - alpha * dot<N>(Pi, kt, d_k));
              std::copy(Pi, Pi + d_k, next + i * d_k);
              axpby<N>(next + i * d_k, alpha, ui, kt, d_k);
            }
          }
          for (int64_t t = t1 - 1; t >= t0; --t) {  // and walk them back
            const int64_t ok = (bh * T + t) * d_k, ov = (bh * T + t) * d_v;
            const scalar_t *kt = kp + ok, *qt = qp + ok, *vt = vp + ov, b = bp[bh * T + t];
            const scalar_t alpha = std::exp(gp[bh * T + t]);
            const scalar_t *prev = Ws.data() + (t - t0) * DD, *cur = prev + DD;
            scalar_t *gq = dqp + ok, *gk = dkp + ok, db = 0, dga = 0;
            std::fill(gq, gq + d_k, scalar_t(0));
            std::fill(gk, gk + d_k, scalar_t(0));
            for (int64_t i = 0; i < d_v; ++i) {
              const scalar_t *Pi = prev + i * d_k, gy = dyp[ov + i];
              scalar_t* dMi = dMh + i * d_k;
              axpy<N>(gq, gy, cur + i * d_k, d_k);  // y_t = W_t q_t
              axpy<N>(dMi, gy, qt, d_k);
              const scalar_t a = dot<N>(Pi, kt, d_k), r = vt[i] - alpha * a, du = dot<N>(dMi, kt, d_k);
              axpy<N>(gk, b * r, dMi, d_k);
              axpy<N>(gk, -alpha * b * du, Pi, d_k);
              db += du * r;
              dga += dot<N>(dMi, Pi, d_k) - b * du * a;
              dvp[ov + i] = b * du;
              axpby<N>(dMi, alpha, -alpha * b * du, kt, d_k);  // alpha (dM_i - beta du_i k)
            }
            dbp[bh * T + t] = db;
            dgp[bh * T + t] = alpha * dga;
          }
        }
      });
    });
  });
  return {dq, dk, dv, dbeta, dg, dM};
}

// ---------------------------------------------------------------------------------------------
// Delta RNN: z, k, v (B, H, T, d), beta (B, H, T), R0 (B, H, d, d), y0 (B, H, d) -> y (B, H, T, d), R_T, v̄ (when
// save; else empty).
std::vector<at::Tensor> delta_rnn_forward(at::Tensor z, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor R0,
                                          at::Tensor y0, bool save) {
  const int64_t B = z.size(0), H = z.size(1), T = z.size(2), d = z.size(3);
  check_dtype(z);
  for (auto [x, name] : {std::pair{&k, "k"}, {&v, "v"}}) check_seq(*x, z.sizes(), name, z);
  check_seq(beta, {B, H, T}, "beta", z), check_state(R0, {B, H, d, d}, "R0"), check_state(y0, {B, H, d}, "y0");
  z = z.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous();
  auto R = as(R0, z).clone(), y0c = as(y0, z), y = at::empty_like(z);
  auto v_bar = at::empty(save ? z.sizes().vec() : std::vector<int64_t>{0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "delta_rnn_forward", [&] {
    const scalar_t *zp = z.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                   *bp = beta.data_ptr<scalar_t>(), *y0p = y0c.data_ptr<scalar_t>();
    scalar_t *Rp = R.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>(), *vbp = ptr<scalar_t>(v_bar);
    dispatch_width(d, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        std::vector<scalar_t> S(d * d), p(d), vb(d), u(d);
        transpose(Rp + bh * d * d, S.data(), d, d);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t o = (bh * T + t) * d;
          softmax<N>(t > 0 ? yp + o - d : y0p + bh * d, p.data(), d);  // softmax(y_{t-1})
          std::copy(zp + o, zp + o + d, yp + o);                        // y_t = z_t + R_t p
          write_and_read_t<N>(S.data(), kp + o, vp + o, bp[bh * T + t], true, p.data(), vb.data(), u.data(), yp + o,
                              d, d);
          if (vbp != nullptr) std::copy(vb.begin(), vb.end(), vbp + o);
        }
        transpose(S.data(), Rp + bh * d * d, d, d);
      });
    });
  });
  return {y, R, v_bar};
}

// dy (B, H, T, d): dL/dy_t, with dL/dy_T (the final state) added at T - 1; dR (B, H, d, d) or empty.
// -> dz, dk, dv (B, H, T, d), dbeta (B, H, T), dR0, dy0.
std::vector<at::Tensor> delta_rnn_backward(at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor v_bar,
                                           at::Tensor y, at::Tensor y0, at::Tensor R, at::Tensor dy, at::Tensor dR) {
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), d = k.size(3);
  check_dtype(k);
  k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous(), v_bar = as(v_bar, k), y = as(y, k);
  y0 = as(y0, k), dy = as(dy, k);
  auto M = as(R, k).clone(), dM = zeros_or(dR, M, k);
  auto dz = at::empty_like(k), dk = at::empty_like(k), dv = at::empty_like(k), dbeta = at::empty_like(beta);
  auto dy0 = at::empty_like(y0);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "delta_rnn_backward", [&] {
    const scalar_t *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(), *bp = beta.data_ptr<scalar_t>(),
                   *vbp = v_bar.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>(), *y0p = y0.data_ptr<scalar_t>(),
                   *dyp = dy.data_ptr<scalar_t>();
    scalar_t *Mp = M.data_ptr<scalar_t>(), *dMp = dM.data_ptr<scalar_t>(), *dzp = dz.data_ptr<scalar_t>(),
             *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>(), *dbp = dbeta.data_ptr<scalar_t>(),
             *dy0p = dy0.data_ptr<scalar_t>();
    dispatch_width(d, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        std::vector<scalar_t> p(d), dp(d), carry(d, 0);  // carry: dL/dy_t through step t + 1
        scalar_t *Mh = Mp + bh * d * d, *dMh = dMp + bh * d * d;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t o = (bh * T + t) * d;
          softmax<N>(t > 0 ? yp + o - d : y0p + bh * d, p.data(), d);
          std::fill(dp.begin(), dp.end(), scalar_t(0));
          std::fill(dkp + o, dkp + o + d, scalar_t(0));
          scalar_t db = 0;
          for (int64_t i = 0; i < d; ++i) {
            scalar_t *Mi = Mh + i * d, *dMi = dMh + i * d;
            const scalar_t gy = dyp[o + i] + carry[i];
            dzp[o + i] = gy;  // y_t = z_t + R_t p_t
            axpy<N>(dp.data(), gy, Mi, d);
            axpy<N>(dMi, gy, p.data(), d);
            dvp[o + i] = delta_write_row_backward<N>(Mi, dMi, kp + o, vp[o + i], vbp[o + i], bp[bh * T + t], dkp + o,
                                                     db, d);
          }
          dbp[bh * T + t] = db;
          softmax_backward<N>(p.data(), dp.data(), carry.data(), d);  // dL/dy_{t-1} through p_t
        }
        std::copy(carry.begin(), carry.end(), dy0p + bh * d);
      });
    });
  });
  return {dz, dk, dv, dbeta, dM, dy0};
}

// ---------------------------------------------------------------------------------------------
// Delta LSTM: z, k, v (B, 3H, T, d), beta (B, 3H, T), gates i, u, o as heads [0, H), [H, 2H), [2H, 3H);
// R0 (B, 3H, d, d), c0, h0 (B, H, d) -> h (B, H, T, d), c (B, H, T, d), R_T, v̄ (B, 3H, T, d; when save).
std::vector<at::Tensor> delta_lstm_forward(at::Tensor z, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor R0,
                                           at::Tensor c0, at::Tensor h0, bool save) {
  const int64_t B = z.size(0), H3 = z.size(1), T = z.size(2), d = z.size(3), H = H3 / 3;
  TORCH_CHECK(H3 % 3 == 0, "delta_lstm: the head dimension holds the 3 gates");
  check_dtype(z);
  for (auto [x, name] : {std::pair{&k, "k"}, {&v, "v"}}) check_seq(*x, z.sizes(), name, z);
  check_seq(beta, {B, H3, T}, "beta", z);
  check_state(R0, {B, H3, d, d}, "R0"), check_state(c0, {B, H, d}, "c0"), check_state(h0, {B, H, d}, "h0");
  z = z.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous();
  auto R = as(R0, z).clone(), c0c = as(c0, z), h0c = as(h0, z);
  auto h = at::empty({B, H, T, d}, z.options()), c = at::empty({B, H, T, d}, z.options());
  auto v_bar = at::empty(save ? z.sizes().vec() : std::vector<int64_t>{0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "delta_lstm_forward", [&] {
    const scalar_t *zp = z.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                   *bp = beta.data_ptr<scalar_t>(), *c0p = c0c.data_ptr<scalar_t>(), *h0p = h0c.data_ptr<scalar_t>();
    scalar_t *Rp = R.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>(),
             *vbp = ptr<scalar_t>(v_bar);
    dispatch_width(d, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        const int64_t b = bh / H, hd = bh % H, gates[3] = {b * H3 + hd, b * H3 + H + hd, b * H3 + 2 * H + hd};
        std::vector<scalar_t> S(3 * d * d), s(d), a(3 * d), vb(d), u(d);
        for (int64_t g = 0; g < 3; ++g) transpose(Rp + gates[g] * d * d, S.data() + g * d * d, d, d);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t o = (bh * T + t) * d;
          softmax<N>(t > 0 ? hp + o - d : h0p + bh * d, s.data(), d);  // softmax(h_{t-1})
          for (int64_t g = 0; g < 3; ++g) {  // a^g = z^g_t + R^g_t s
            const int64_t og = (gates[g] * T + t) * d;
            std::copy(zp + og, zp + og + d, a.data() + g * d);
            write_and_read_t<N>(S.data() + g * d * d, kp + og, vp + og, bp[gates[g] * T + t], true, s.data(),
                                vb.data(), u.data(), a.data() + g * d, d, d);
            if (vbp != nullptr) std::copy(vb.begin(), vb.end(), vbp + og);
          }
          const scalar_t* c_prev = t > 0 ? cp + o - d : c0p + bh * d;
          sigmoid_row<N>(a.data(), a.data(), d);  // the gates i and o
          sigmoid_row<N>(a.data() + 2 * d, a.data() + 2 * d, d);
          for (int64_t i = 0; i < d; ++i) {
            cp[o + i] = a[i] * a[d + i] + (1 - a[i]) * c_prev[i];
            hp[o + i] = a[2 * d + i] * cp[o + i];
          }
        }
        for (int64_t g = 0; g < 3; ++g) transpose(S.data() + g * d * d, Rp + gates[g] * d * d, d, d);
      });
    });
  });
  return {h, c, R, v_bar};
}

// dh (B, H, T, d): dL/dh_t with dL/dh_T added at T - 1; dc (B, H, d): dL/dc_T or empty; dR or empty.
// -> dz, dk, dv (B, 3H, T, d), dbeta (B, 3H, T), dR0, dc0, dh0.
std::vector<at::Tensor> delta_lstm_backward(at::Tensor z, at::Tensor k, at::Tensor v, at::Tensor beta,
                                            at::Tensor v_bar, at::Tensor h, at::Tensor c, at::Tensor h0,
                                            at::Tensor c0, at::Tensor R, at::Tensor dh, at::Tensor dc, at::Tensor dR) {
  const int64_t B = z.size(0), H3 = z.size(1), T = z.size(2), d = z.size(3), H = H3 / 3;
  check_dtype(z);
  z = z.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous(), v_bar = as(v_bar, z);
  h = as(h, z), c = as(c, z), h0 = as(h0, z), c0 = as(c0, z), dh = as(dh, z);
  auto M = as(R, z).clone(), dM = zeros_or(dR, M, z), gc_all = zeros_or(dc, c0, z).clone();
  auto dz = at::empty_like(z), dk = at::empty_like(z), dv = at::empty_like(z), dbeta = at::empty_like(beta);
  auto dh0 = at::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "delta_lstm_backward", [&] {
    const scalar_t *zp = z.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                   *bp = beta.data_ptr<scalar_t>(), *vbp = v_bar.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>(),
                   *cp = c.data_ptr<scalar_t>(), *h0p = h0.data_ptr<scalar_t>(), *c0p = c0.data_ptr<scalar_t>(),
                   *dhp = dh.data_ptr<scalar_t>();
    scalar_t *Mp = M.data_ptr<scalar_t>(), *dMp = dM.data_ptr<scalar_t>(), *gcp = gc_all.data_ptr<scalar_t>(),
             *dzp = dz.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>(),
             *dbp = dbeta.data_ptr<scalar_t>(), *dh0p = dh0.data_ptr<scalar_t>();
    dispatch_width(d, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        const int64_t b = bh / H, hd = bh % H;
        std::vector<scalar_t> s(d), ds(d), a(3 * d), da(3 * d), sg(2 * d), carry(d, 0);  // carry: dL/dh_t, step t + 1
        scalar_t* gc = gcp + bh * d;                                            // dL/dc_t
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t o = (bh * T + t) * d;
          softmax<N>(t > 0 ? hp + o - d : h0p + bh * d, s.data(), d);
          for (int64_t g = 0; g < 3; ++g) {  // the gates' pre-activations again, from R_t
            const int64_t gate = b * H3 + g * H + hd, og = (gate * T + t) * d;
            for (int64_t i = 0; i < d; ++i) a[g * d + i] = zp[og + i] + dot<N>(Mp + (gate * d + i) * d, s.data(), d);
          }
          const scalar_t* c_prev = t > 0 ? cp + o - d : c0p + bh * d;
          sigmoid_row<N>(a.data(), sg.data(), d);  // the gates i and o again
          sigmoid_row<N>(a.data() + 2 * d, sg.data() + d, d);
          for (int64_t i = 0; i < d; ++i) {
            const scalar_t gh = dhp[o + i] + carry[i], ig = sg[i], og = sg[d + i];
            gc[i] += gh * og;  // h_t = o c_t
            da[i] = gc[i] * (a[d + i] - c_prev[i]) * ig * (1 - ig);  // c_t = i u + (1 - i) c_{t-1}
            da[d + i] = gc[i] * ig;
            da[2 * d + i] = gh * cp[o + i] * og * (1 - og);
            gc[i] *= 1 - ig;  // dL/dc_{t-1}
          }
          std::fill(ds.begin(), ds.end(), scalar_t(0));
          for (int64_t g = 0; g < 3; ++g) {
            const int64_t gate = b * H3 + g * H + hd, og = (gate * T + t) * d;
            scalar_t db = 0;
            std::fill(dkp + og, dkp + og + d, scalar_t(0));
            for (int64_t i = 0; i < d; ++i) {
              scalar_t *Mi = Mp + (gate * d + i) * d, *dMi = dMp + (gate * d + i) * d;
              const scalar_t g_a = da[g * d + i];
              dzp[og + i] = g_a;
              axpy<N>(ds.data(), g_a, Mi, d);  // dL/ds = sum_g R^g_t^T da^g
              axpy<N>(dMi, g_a, s.data(), d);
              dvp[og + i] = delta_write_row_backward<N>(Mi, dMi, kp + og, vp[og + i], vbp[og + i], bp[gate * T + t],
                                                     dkp + og, db, d);
            }
            dbp[gate * T + t] = db;
          }
          softmax_backward<N>(s.data(), ds.data(), carry.data(), d);  // dL/dh_{t-1} through s_t
        }
        std::copy(carry.begin(), carry.end(), dh0p + bh * d);
      });
    });
  });
  return {dz, dk, dv, dbeta, dM, gc_all, dh0};
}

// ---------------------------------------------------------------------------------------------
// RDN: q, k, v (B, H, T, d), b (B, H, T) from x; Rs (3, H, d, d) = R_q, R_k, R_v; r_b (H, d); W0 (B, H, d, d),
// y0 (B, H, d) -> y (B, H, T, d), W_T and, when save, the squashed q, k (with l2: their pre-activations, the map is
// recomputed in the backward), the value v, beta and v̄ of every step. beta_scale: beta = beta_scale sigmoid(.) (2 with
// neg_eigval); l2: q', k' by the l2 map (q' times d^-1/2) instead of the softmax.
std::vector<at::Tensor> rdn_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor b, at::Tensor Rs,
                                    at::Tensor r_b, at::Tensor W0, at::Tensor y0, bool save, double beta_scale,
                                    bool l2) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  check_dtype(q);
  for (auto [x, name] : {std::pair{&k, "k"}, {&v, "v"}}) check_seq(*x, q.sizes(), name, q);
  check_seq(b, {B, H, T}, "b", q);
  check_state(Rs, {3, H, d, d}, "Rs"), check_state(r_b, {H, d}, "r_b");
  check_state(W0, {B, H, d, d}, "W0"), check_state(y0, {B, H, d}, "y0");
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous(), b = b.contiguous();
  Rs = as(Rs, q), r_b = as(r_b, q), y0 = as(y0, q);
  auto W = as(W0, q).clone(), y = at::empty_like(q);
  const std::vector<int64_t> sv = save ? q.sizes().vec() : std::vector<int64_t>{0},
                             sb = save ? std::vector<int64_t>{B, H, T} : std::vector<int64_t>{0};
  auto q_sv = at::empty(sv, q.options()), k_sv = at::empty(sv, q.options()), v_sv = at::empty(sv, q.options()),
       v_bar = at::empty(sv, q.options()), beta = at::empty(sb, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rdn_forward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(),
                   *bp = b.data_ptr<scalar_t>(), *Rp = Rs.data_ptr<scalar_t>(), *rbp = r_b.data_ptr<scalar_t>(),
                   *y0p = y0.data_ptr<scalar_t>();
    scalar_t *Wp = W.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>(), *q_svp = ptr<scalar_t>(q_sv),
             *k_svp = ptr<scalar_t>(k_sv), *v_svp = ptr<scalar_t>(v_sv), *v_barp = ptr<scalar_t>(v_bar),
             *beta_p = ptr<scalar_t>(beta);
    dispatch_width(d, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        const int64_t hd = bh % H;
        std::vector<scalar_t> S(d * d), Rt(3 * d * d), s(d), pre(3 * d), qh(d), kh(d), vb(d), u(d);
        transpose(Wp + bh * d * d, S.data(), d, d);
        for (int64_t r = 0; r < 3; ++r) transpose(Rp + (r * H + hd) * d * d, Rt.data() + r * d * d, d, d);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t o = (bh * T + t) * d;
          const scalar_t* y_prev = t > 0 ? yp + o - d : y0p + bh * d;
          tanh_row<N>(y_prev, s.data(), d);
          const scalar_t bt = scalar_t(beta_scale) * sigmoid(bp[bh * T + t] + dot<N>(rbp + hd * d, s.data(), d));
          std::copy(qp + o, qp + o + d, pre.data());  // q_t + R_q s, k_t + R_k s, v_t + R_v s
          std::copy(kp + o, kp + o + d, pre.data() + d);
          std::copy(vp + o, vp + o + d, pre.data() + 2 * d);
          for (int64_t r = 0; r < 3; ++r) mat_vec_t<N>(Rt.data() + r * d * d, s.data(), pre.data() + r * d, d, d);
          if (l2) {
            l2_map<N>(pre.data(), qh.data(), scalar_t(1 / std::sqrt(double(d))), d);
            l2_map<N>(pre.data() + d, kh.data(), scalar_t(1), d);
          } else {
            softmax<N>(pre.data(), qh.data(), d);
            softmax<N>(pre.data() + d, kh.data(), d);
          }
          std::fill(yp + o, yp + o + d, scalar_t(0));
          write_and_read_t<N>(S.data(), kh.data(), pre.data() + 2 * d, bt, true, qh.data(), vb.data(), u.data(),
                              yp + o, d, d);
          if (save) {
            std::copy(l2 ? pre.begin() : qh.begin(), l2 ? pre.begin() + d : qh.end(), q_svp + o);
            std::copy(l2 ? pre.begin() + d : kh.begin(), l2 ? pre.begin() + 2 * d : kh.end(), k_svp + o);
            std::copy(pre.begin() + 2 * d, pre.end(), v_svp + o);
            std::copy(vb.begin(), vb.end(), v_barp + o);
            beta_p[bh * T + t] = bt;
          }
        }
        transpose(S.data(), Wp + bh * d * d, d, d);
      });
    });
  });
  return {y, W, q_sv, k_sv, v_sv, beta, v_bar};
}

// The saved tensors of rdn_forward, dy (dL/dy_t with dL/dy_T added at T - 1), dW (or empty) -> dq, dk, dv, db (of
// the inputs q, k, v, b), dW0, dy0. The slow weights' gradients are sums over b and t, left to the caller.
std::vector<at::Tensor> rdn_backward(at::Tensor Rs, at::Tensor r_b, at::Tensor q_sv, at::Tensor k_sv,
                                     at::Tensor v_sv, at::Tensor beta, at::Tensor v_bar, at::Tensor y, at::Tensor y0,
                                     at::Tensor W, at::Tensor dy, at::Tensor dW, double beta_scale, bool l2) {
  const int64_t B = y.size(0), H = y.size(1), T = y.size(2), d = y.size(3);
  check_dtype(y);
  TORCH_CHECK(q_sv.sizes() == y.sizes(), "rdn_backward: the forward did not save its vectors (save=false)");
  y = y.contiguous(), Rs = as(Rs, y), r_b = as(r_b, y), dy = as(dy, y), y0 = as(y0, y);
  q_sv = as(q_sv, y), k_sv = as(k_sv, y), v_sv = as(v_sv, y), v_bar = as(v_bar, y), beta = as(beta, y);
  auto M = as(W, y).clone(), dM = zeros_or(dW, M, y);
  auto dq = at::empty_like(y), dk = at::empty_like(y), dv = at::empty_like(y), db = at::empty_like(beta);
  auto dy0 = at::empty_like(y0);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rdn_backward", [&] {
    const scalar_t *Rp = Rs.data_ptr<scalar_t>(), *rbp = r_b.data_ptr<scalar_t>(), *q_svp = q_sv.data_ptr<scalar_t>(),
                   *k_svp = k_sv.data_ptr<scalar_t>(), *vh = v_sv.data_ptr<scalar_t>(), *btp = beta.data_ptr<scalar_t>(),
                   *vbp = v_bar.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>(), *y0p = y0.data_ptr<scalar_t>(),
                   *dyp = dy.data_ptr<scalar_t>();
    scalar_t *Mp = M.data_ptr<scalar_t>(), *dMp = dM.data_ptr<scalar_t>(), *dqp = dq.data_ptr<scalar_t>(),
             *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>(), *dbp = db.data_ptr<scalar_t>(),
             *dy0p = dy0.data_ptr<scalar_t>();
    dispatch_width(d, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(B * H, [&](int64_t bh) {
        const int64_t hd = bh % H;
        const scalar_t *Rq = Rp + hd * d * d, *Rk = Rp + (H + hd) * d * d, *Rv = Rp + (2 * H + hd) * d * d;
        const scalar_t q_scale = scalar_t(1 / std::sqrt(double(d)));
        std::vector<scalar_t> dqh(d), dkh(d), ds(d), s(d), carry(d, 0), q_l2(l2 ? d : 0), k_l2(l2 ? d : 0);
        scalar_t *Mh = Mp + bh * d * d, *dMh = dMp + bh * d * d;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t o = (bh * T + t) * d;
          const scalar_t bt = btp[bh * T + t];
          if (l2) {  // q', k' again from their pre-activations
            l2_map<N>(q_svp + o, q_l2.data(), q_scale, d);
            l2_map<N>(k_svp + o, k_l2.data(), scalar_t(1), d);
          }
          const scalar_t *qh = l2 ? q_l2.data() : q_svp + o, *kh = l2 ? k_l2.data() : k_svp + o;
          scalar_t dbt = 0;
          std::fill(dqh.begin(), dqh.end(), scalar_t(0));
          std::fill(dkh.begin(), dkh.end(), scalar_t(0));
          for (int64_t i = 0; i < d; ++i) {
            scalar_t *Mi = Mh + i * d, *dMi = dMh + i * d;
            const scalar_t gy = dyp[o + i] + carry[i];
            axpy<N>(dqh.data(), gy, Mi, d);  // y_t = W_t q
            axpy<N>(dMi, gy, qh, d);
            dvp[o + i] = delta_write_row_backward<N>(Mi, dMi, kh, vh[o + i], vbp[o + i], bt, dkh.data(), dbt, d);
          }
          if (l2) {
            l2_map_backward<N>(q_svp + o, dqh.data(), dqp + o, q_scale, d);
            l2_map_backward<N>(k_svp + o, dkh.data(), dkp + o, scalar_t(1), d);
          } else {
            softmax_backward<N>(qh, dqh.data(), dqp + o, d);
            softmax_backward<N>(kh, dkh.data(), dkp + o, d);
          }
          const scalar_t dbp_t = dbt * bt * (1 - bt / scalar_t(beta_scale));  // beta = beta_scale sigmoid(.)
          dbp[bh * T + t] = dbp_t;
          for (int64_t j = 0; j < d; ++j) ds[j] = rbp[hd * d + j] * dbp_t;  // dL/ds = R_q^T dq + R_k^T dk + R_v^T dv
          for (int64_t i = 0; i < d; ++i) {                                   //         + r_b db
            axpy<N>(ds.data(), dqp[o + i], Rq + i * d, d);
            axpy<N>(ds.data(), dkp[o + i], Rk + i * d, d);
            axpy<N>(ds.data(), dvp[o + i], Rv + i * d, d);
          }
          const scalar_t* y_prev = t > 0 ? yp + o - d : y0p + bh * d;
          tanh_row<N>(y_prev, s.data(), d);  // s = tanh(y_{t-1})
          for (int64_t j = 0; j < d; ++j) carry[j] = ds[j] * (1 - s[j] * s[j]);
        }
        std::copy(carry.begin(), carry.end(), dy0p + bh * d);
      });
    });
  });
  return {dq, dk, dv, db, dM, dy0};
}

// ---------------------------------------------------------------------------------------------
// The continuous-time delta rule (ode_fwp.py; Oja's rule on W^T has the same form): euler or rk4 on
// dY/ds = c (a - Y p) p^T, Y (rows x cols) per batch entry and head, with a (B, S, H, rows), p (B, S, H, cols),
// c (B, S, H) tabulated at the solver's stage nodes (the model's own layout; node j of step i at i * stride + j:
// euler 1 node per step, stride 1; rk4 nodes i h, i h + h/2, (i + 1) h, stride 2). Each row y of Y is its own ODE,
// y' = c (a_r - y . p) p: a stage at node j, after the stage sigma' p_j' at node j', is sigma p_j with
//   sigma = c_j (a_j,r - y . p_j - alpha h sigma' (p_j' . p_j)),   and the step is y <- y + h sum_m b_m sigma_m p_j(m)
// The rows are computed together (sigma a vector over the rows). The forward saves Y at the start of every step; the
// backward walks the steps back from it.
namespace {

struct Stage {
  int node;
  double alpha, b;
};
const Stage EULER[] = {{0, 0.0, 1.0}};
const Stage RK4[] = {{0, 0.0, 1.0 / 6}, {1, 0.5, 1.0 / 3}, {1, 0.5, 1.0 / 3}, {2, 1.0, 1.0 / 6}};

struct Steps {  // the solver's stages and where a step's nodes lie in the table
  const Stage* stages;
  int n_stages, n_nodes, stride;
  explicit Steps(bool rk4)
      : stages(rk4 ? RK4 : EULER), n_stages(rk4 ? 4 : 1), n_nodes(rk4 ? 3 : 1), stride(rk4 ? 2 : 1) {}
};

// One step's stages for every row at once. Y is kept transposed (Yt, cols x rows: a row index runs along memory, so
// each loop below is a vector loop over the rows): u_j = Y p_j, then sigma_m = c_j res_m with the bracket
// res_m = a_j - u_j - alpha_m h g_m sigma_m-1. u: n_nodes x rows; sigma, res: n_stages x rows.
template <int N, typename T>
inline void ct_stages(const Steps& st, const T* Yt, const T* const* p, const T* const* a, const T* c, const T* g, T h,
                      int64_t rows, int64_t cols, T* u, T* sigma, T* res) {
  if constexpr (N > 0) rows = N, cols = N;
  for (int j = 0; j < st.n_nodes; ++j) {
    T* uj = u + j * rows;
    std::fill(uj, uj + rows, T(0));
    for (int64_t col = 0; col < cols; ++col) axpy<N>(uj, p[j][col], Yt + col * rows, rows);
  }
  for (int m = 0; m < st.n_stages; ++m) {
    const int j = st.stages[m].node;
    const T *aj = a[j], *uj = u + j * rows, f = m ? T(st.stages[m].alpha) * h * g[m] : T(0);
    const T* prev = sigma + (m ? m - 1 : 0) * rows;
    T *rm = res + m * rows, *sm = sigma + m * rows;
    if (m) {
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) rm[r] = aj[r] - uj[r] - f * prev[r];
    } else {
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) rm[r] = aj[r] - uj[r];
    }
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) sm[r] = c[j] * rm[r];
  }
}

// The step's increment per node: z_j = h sum of b_m sigma_m over the stages m at node j (Y <- Y + sum_j z_j p_j^T).
template <int N, typename T>
inline void ct_increments(const Steps& st, const T* sigma, T h, int64_t rows, T* z) {
  if constexpr (N > 0) rows = N;
  std::fill(z, z + st.n_nodes * rows, T(0));
  for (int m = 0; m < st.n_stages; ++m)
    axpy<N>(z + st.stages[m].node * rows, h * T(st.stages[m].b), sigma + m * rows, rows);
}

// f(w) with w a compile-time row length N for the CT-FWPs' head sizes (d_model / n_head: 8 by default; 0: any other)
template <typename F>
void dispatch_ct_width(int64_t d, F&& f) {
  switch (d) {
    case 8: return f(std::integral_constant<int, 8>());
    case 16: return f(std::integral_constant<int, 16>());
    case 32: return f(std::integral_constant<int, 32>());
    default: return f(std::integral_constant<int, 0>());
  }
}

// Where one head's values of node n lie in a (B, S, H, width) table: at base + n * H * width.
struct Table {
  int64_t S, H;
  int64_t base(int64_t bh, int64_t width) const { return ((bh / H) * S * H + bh % H) * width; }
  int64_t node(int64_t n, int64_t width) const { return n * H * width; }
};

}  // namespace

// Y0 (B, H, rows, cols), a (B, S, H, rows), p (B, S, H, cols), c (B, S, H), n_steps steps of size h -> Y (B, H, rows,
// cols), Ys (Y^T at the start of each step, B H x n x cols x rows).
std::vector<at::Tensor> ct_linear_rule_forward(at::Tensor Y0, at::Tensor a, at::Tensor p, at::Tensor c,
                                               int64_t n_steps, double step, bool rk4) {
  const Steps st(rk4);
  const int64_t B = a.size(0), S = a.size(1), H = a.size(2), rows = a.size(3), cols = p.size(3), BH = B * H;
  check_dtype(a);
  TORCH_CHECK(S == n_steps * st.stride + 1, "FWP CPU kernel: the table needs ", n_steps * st.stride + 1, " nodes");
  check_seq(p, {B, S, H, cols}, "p", a), check_seq(c, {B, S, H}, "c", a), check_seq(Y0, {B, H, rows, cols}, "Y0", a);
  a = a.contiguous(), p = p.contiguous(), c = c.contiguous();
  auto Y = Y0.contiguous().clone();
  auto Ys = at::empty({BH, n_steps, cols, rows}, a.options());
  const Table tab{S, H};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ct_linear_rule_forward", [&] {
    const scalar_t *ap = a.data_ptr<scalar_t>(), *pp = p.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
    scalar_t *Yp = Y.data_ptr<scalar_t>(), *Ysp = Ys.data_ptr<scalar_t>();
    const scalar_t h = scalar_t(step);
    dispatch_ct_width(rows == cols ? cols : 0, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(BH, [&](int64_t bh) {
        scalar_t* Yb = Yp + bh * rows * cols;
        const scalar_t *ab = ap + tab.base(bh, rows), *pb = pp + tab.base(bh, cols), *cb = cp + tab.base(bh, 1);
        std::vector<scalar_t> Yt(rows * cols), u(3 * rows), sigma(4 * rows), res(4 * rows), z(3 * rows);
        transpose(Yb, Yt.data(), rows, cols);
        for (int64_t i = 0; i < n_steps; ++i) {
          const scalar_t *pj[3], *aj[3];
          scalar_t cj[3];
          for (int j = 0; j < st.n_nodes; ++j) {
            const int64_t n = i * st.stride + j;
            pj[j] = pb + tab.node(n, cols), aj[j] = ab + tab.node(n, rows), cj[j] = cb[tab.node(n, 1)];
          }
          scalar_t g[4] = {0, 0, 0, 0};
          for (int m = 1; m < st.n_stages; ++m) g[m] = dot<N>(pj[st.stages[m - 1].node], pj[st.stages[m].node], cols);
          std::copy(Yt.begin(), Yt.end(), Ysp + (bh * n_steps + i) * rows * cols);
          ct_stages<N>(st, Yt.data(), pj, aj, cj, g, h, rows, cols, u.data(), sigma.data(), res.data());
          ct_increments<N>(st, sigma.data(), h, rows, z.data());
          for (int64_t col = 0; col < cols; ++col)  // Y^T <- Y^T + sum_j p_j z_j^T
            for (int j = 0; j < st.n_nodes; ++j) axpy<N>(Yt.data() + col * rows, pj[j][col], z.data() + j * rows, rows);
        }
        transpose(Yt.data(), Yb, cols, rows);
      });
    });
  });
  return {Y, Ys};
}

// dY (B, H, rows, cols), Ys, a, p, c, n_steps, h -> dY0, da, dp, dc.
std::vector<at::Tensor> ct_linear_rule_backward(at::Tensor dY, at::Tensor Ys, at::Tensor a, at::Tensor p,
                                                at::Tensor c, int64_t n_steps, double step, bool rk4) {
  const Steps st(rk4);
  const int64_t B = a.size(0), S = a.size(1), H = a.size(2), rows = a.size(3), cols = p.size(3), BH = B * H;
  check_dtype(a);
  check_seq(Ys, {BH, n_steps, cols, rows}, "Ys", a);
  a = a.contiguous(), p = p.contiguous(), c = c.contiguous(), Ys = Ys.contiguous();
  auto dY0 = as(dY, a).clone();
  check_state(dY0, {B, H, rows, cols}, "dY");
  auto da = at::zeros_like(a), dp = at::zeros_like(p), dc = at::zeros_like(c);
  const Table tab{S, H};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ct_linear_rule_backward", [&] {
    const scalar_t *ap = a.data_ptr<scalar_t>(), *pp = p.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>(),
                   *Ysp = Ys.data_ptr<scalar_t>();
    scalar_t *dYp = dY0.data_ptr<scalar_t>(), *dap = da.data_ptr<scalar_t>(), *dpp = dp.data_ptr<scalar_t>(),
             *dcp = dc.data_ptr<scalar_t>();
    const scalar_t h = scalar_t(step);
    dispatch_ct_width(rows == cols ? cols : 0, [&](auto w) {
      constexpr int N = decltype(w)::value;
      for_each_head(BH, [&](int64_t bh) {
        scalar_t* dYb = dYp + bh * rows * cols;
        const int64_t a0 = tab.base(bh, rows), p0 = tab.base(bh, cols), c0 = tab.base(bh, 1);
        // dL/dY^T after the step, then (in place) before it
        std::vector<scalar_t> dYt(rows * cols), u(3 * rows), sigma(4 * rows), res(4 * rows), z(3 * rows);
        std::vector<scalar_t> dz(3 * rows), du(3 * rows), dsigma(4 * rows), dres(rows);
        transpose(dYb, dYt.data(), rows, cols);
        for (int64_t i = n_steps - 1; i >= 0; --i) {
          const scalar_t *pj[3], *aj[3];
          scalar_t *dpj[3], *daj[3], *dcj[3], cj[3];
          for (int j = 0; j < st.n_nodes; ++j) {
            const int64_t n = i * st.stride + j;
            pj[j] = pp + p0 + tab.node(n, cols), dpj[j] = dpp + p0 + tab.node(n, cols);
            aj[j] = ap + a0 + tab.node(n, rows), daj[j] = dap + a0 + tab.node(n, rows);
            cj[j] = cp[c0 + tab.node(n, 1)], dcj[j] = dcp + c0 + tab.node(n, 1);
          }
          scalar_t g[4] = {0, 0, 0, 0}, dg[4] = {0, 0, 0, 0};
          for (int m = 1; m < st.n_stages; ++m) g[m] = dot<N>(pj[st.stages[m - 1].node], pj[st.stages[m].node], cols);
          const scalar_t* Yt = Ysp + (bh * n_steps + i) * rows * cols;
          ct_stages<N>(st, Yt, pj, aj, cj, g, h, rows, cols, u.data(), sigma.data(), res.data());
          ct_increments<N>(st, sigma.data(), h, rows, z.data());
          // Y' = Y + sum_j z_j p_j^T: dz_j = dY' p_j, dp_j += dY'^T z_j
          std::fill(dz.begin(), dz.end(), scalar_t(0));
          for (int64_t col = 0; col < cols; ++col) {
            const scalar_t* dy = dYt.data() + col * rows;
            for (int j = 0; j < st.n_nodes; ++j) {
              axpy<N>(dz.data() + j * rows, pj[j][col], dy, rows);
              dpj[j][col] += dot<N>(dy, z.data() + j * rows, rows);
            }
          }
          for (int m = 0; m < st.n_stages; ++m) {
            scalar_t *ds = dsigma.data() + m * rows, hb = h * scalar_t(st.stages[m].b);
            const scalar_t* dzj = dz.data() + st.stages[m].node * rows;
            for (int64_t r = 0; r < rows; ++r) ds[r] = hb * dzj[r];
          }
          std::fill(du.begin(), du.end(), scalar_t(0));
          for (int m = st.n_stages - 1; m >= 0; --m) {  // sigma_m = c_j (a_j - u_j - alpha h g_m sigma_m-1)
            const int j = st.stages[m].node;
            const scalar_t* ds = dsigma.data() + m * rows;
            *dcj[j] += dot<N>(ds, res.data() + m * rows, rows);
            for (int64_t r = 0; r < rows; ++r) dres[r] = ds[r] * cj[j];
            axpy<N>(daj[j], scalar_t(1), dres.data(), rows);
            axpy<N>(du.data() + j * rows, scalar_t(-1), dres.data(), rows);
            if (m) {
              const scalar_t ahg = scalar_t(st.stages[m].alpha) * h * g[m];
              axpy<N>(dsigma.data() + (m - 1) * rows, -ahg, dres.data(), rows);
              dg[m] -= scalar_t(st.stages[m].alpha) * h * dot<N>(dres.data(), sigma.data() + (m - 1) * rows, rows);
            }
          }
          for (int64_t col = 0; col < cols; ++col) {  // u_j = Y p_j: dY^T += p_j du_j^T, dp_j += Y^T du_j
            for (int j = 0; j < st.n_nodes; ++j) {
              axpy<N>(dYt.data() + col * rows, pj[j][col], du.data() + j * rows, rows);
              dpj[j][col] += dot<N>(Yt + col * rows, du.data() + j * rows, rows);
            }
          }
          for (int m = 1; m < st.n_stages; ++m) {  // g_m = p_j(m-1) . p_j(m)
            axpy<N>(dpj[st.stages[m - 1].node], dg[m], pj[st.stages[m].node], cols);
            axpy<N>(dpj[st.stages[m].node], dg[m], pj[st.stages[m - 1].node], cols);
          }
        }
        transpose(dYt.data(), dYb, cols, rows);
      });
    });
  });
  return {dY0, da, dp, dc};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fast_weight_forward, "fast-weight update forward (sum or delta rule)");
  m.def("backward", &fast_weight_backward, "fast-weight update backward (sum or delta rule)");
  m.def("gated_delta_forward", &gated_delta_forward, "gated delta rule forward (saves the state every 32 steps)");
  m.def("gated_delta_backward", &gated_delta_backward, "gated delta rule backward (recomputes from the saved states)");
  m.def("delta_rnn_forward", &delta_rnn_forward, "Delta RNN recurrence, forward");
  m.def("delta_rnn_backward", &delta_rnn_backward, "Delta RNN recurrence, backward");
  m.def("delta_lstm_forward", &delta_lstm_forward, "Delta LSTM recurrence, forward");
  m.def("delta_lstm_backward", &delta_lstm_backward, "Delta LSTM recurrence, backward");
  m.def("rdn_forward", &rdn_forward, "Recurrent Delta Net recurrence, forward");
  m.def("rdn_backward", &rdn_backward, "Recurrent Delta Net recurrence, backward");
  m.def("ct_linear_rule_forward", &ct_linear_rule_forward, "continuous-time delta rule, euler or rk4, forward");
  m.def("ct_linear_rule_backward", &ct_linear_rule_backward, "continuous-time delta rule, euler or rk4, backward");
}
