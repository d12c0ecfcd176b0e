// Fast-weight update kernels shared by the FWP scripts: the sum rule and the delta rule in their
// recurrent form, forward and backward, JIT-loaded with torch.utils.cpp_extension.load.
//
// Per batch b and head h, W is d_v x d_k (fp32, or fp64 for fp64 inputs), starting from W0:
//   sum:   W_t = W_{t-1} + v_t k_t^T                          y_t = W_t q_t
//   delta: W_t = W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T    y_t = W_t q_t
// Row i of W evolves on its own (it only sees v_t[i] and the shared k_t), so one warp owns one row:
// each lane keeps ceil(d_k / 32) <= 4 entries of it in registers (d_k <= 128, any d_v, any T).
// q, k and beta are staged through shared memory a tile of time steps at a time.
//
// Backward: no W is stored per time step. The forward saves the final W and, for the delta rule,
// v̄_t = W_{t-1} k_t (a (B, H, T, d_v) tensor, the size of v); the backward walks time in reverse
// and undoes each write exactly as written, W_{t-1} = W_t - beta_t (v_t - v̄_t) k_t^T (sum rule:
// W_{t-1} = W_t - v_t k_t^T). We chose reversal over recomputing from checkpoints of W because it
// needs no extra pass and O(T d_v) memory; its rounding error adds up (it does not compound), which the
// tests bound at T = 1000 in fp32. Cross-row sums (dq, dk, dbeta) are accumulated per tile in shared
// memory and added to global fp32 buffers once per block and tile.
#include <torch/extension.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one row of W each

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

template <typename acc_t>
__host__ __device__ constexpr int tile_steps() { return sizeof(acc_t) == 8 ? 8 : 16; }  // 4 tiles of TS x 128 fit in 32 KB

// Load q_t, k_t (and beta_t) for t in [t0, t0 + TS) into shared memory, zero beyond T.
template <typename scalar_t, typename acc_t>
__device__ void load_tile(const scalar_t* q, const scalar_t* k, const scalar_t* beta, acc_t* sq, acc_t* sk,
                          acc_t* sb, int t0, int TS, int T, int d_k) {
  for (int e = threadIdx.x; e < TS * d_k; e += blockDim.x) {
    const int t = t0 + e / d_k;
    sq[e] = t < T ? static_cast<acc_t>(q[(int64_t)t * d_k + e % d_k]) : acc_t(0);
    sk[e] = t < T ? static_cast<acc_t>(k[(int64_t)t * d_k + e % d_k]) : acc_t(0);
  }
  for (int s = threadIdx.x; s < TS; s += blockDim.x)
    sb[s] = (beta != nullptr && t0 + s < T) ? static_cast<acc_t>(beta[t0 + s]) : acc_t(1);
}

// grid (B*H, ceil(d_v / kRowsPerBlock)); block kRowsPerBlock warps.
template <typename scalar_t, int KPL, bool DELTA>
__global__ void fast_weight_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                           const scalar_t* __restrict__ v, const scalar_t* __restrict__ beta,
                                           const float* __restrict__ W0_f, const double* __restrict__ W0_d,
                                           scalar_t* __restrict__ y, void* __restrict__ vbar_out,
                                           void* __restrict__ W_out, int T, int d_k, int d_v) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TS = tile_steps<acc_t>();
  extern __shared__ unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sk = sq + TS * d_k;
  acc_t* sb = sk + TS * d_k;
  const int bh = blockIdx.x, lane = threadIdx.x % 32;
  const int row = blockIdx.y * kRowsPerBlock + threadIdx.x / 32;
  const bool active = row < d_v;
  q += (int64_t)bh * T * d_k;
  k += (int64_t)bh * T * d_k;
  v += (int64_t)bh * T * d_v;
  y += (int64_t)bh * T * d_v;
  if (beta != nullptr) beta += (int64_t)bh * T;
  acc_t* vbar = vbar_out == nullptr ? nullptr : static_cast<acc_t*>(vbar_out) + (int64_t)bh * T * d_v;
  acc_t W[KPL];
  const int64_t w_off = ((int64_t)bh * d_v + row) * d_k;
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    const int c = lane + 32 * j;
    W[j] = acc_t(0);
    if (active && c < d_k) W[j] = W0_d != nullptr ? static_cast<acc_t>(W0_d[w_off + c])
                                  : W0_f != nullptr ? static_cast<acc_t>(W0_f[w_off + c]) : acc_t(0);
  }
  for (int t0 = 0; t0 < T; t0 += TS) {
    __syncthreads();
    load_tile(q, k, beta, sq, sk, sb, t0, TS, T, d_k);
    __syncthreads();
    if (!active) continue;
    for (int s = 0; s < TS && t0 + s < T; ++s) {
      const int t = t0 + s;
      acc_t kk[KPL], qq[KPL];
#pragma unroll
      for (int j = 0; j < KPL; ++j) {
        const int c = lane + 32 * j;
        kk[j] = c < d_k ? sk[s * d_k + c] : acc_t(0);
        qq[j] = c < d_k ? sq[s * d_k + c] : acc_t(0);
      }
      const acc_t v_t = static_cast<acc_t>(v[(int64_t)t * d_v + row]);
      acc_t d = v_t;  // the sum rule writes v_t
      if (DELTA) {
        acc_t a = 0;
#pragma unroll
        for (int j = 0; j < KPL; ++j) a += W[j] * kk[j];
        a = warp_sum(a);  // v̄_t[row] = W_{t-1}[row] . k_t
        d = sb[s] * (v_t - a);
        if (lane == 0) vbar[(int64_t)t * d_v + row] = a;
      }
      acc_t o = 0;
#pragma unroll
      for (int j = 0; j < KPL; ++j) {
        W[j] += d * kk[j];
        o += W[j] * qq[j];
      }
      o = warp_sum(o);
      if (lane == 0) y[(int64_t)t * d_v + row] = static_cast<scalar_t>(o);
    }
  }
  if (active) {
#pragma unroll
    for (int j = 0; j < KPL; ++j)
      if (lane + 32 * j < d_k) static_cast<acc_t*>(W_out)[w_off + lane + 32 * j] = W[j];
  }
}

template <typename scalar_t, int KPL, bool DELTA>
__global__ void fast_weight_backward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                            const scalar_t* __restrict__ v, const scalar_t* __restrict__ beta,
                                            const void* __restrict__ vbar_in, const void* __restrict__ WT,
                                            const scalar_t* __restrict__ dy, const void* __restrict__ dWT,
                                            void* __restrict__ dq_out, void* __restrict__ dk_out,
                                            void* __restrict__ dv_out, void* __restrict__ dbeta_out,
                                            void* __restrict__ dW0_out, int T, int d_k, int d_v) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TS = tile_steps<acc_t>();
  extern __shared__ unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sk = sq + TS * d_k;
  acc_t* sdq = sk + TS * d_k;
  acc_t* sdk = sdq + TS * d_k;
  acc_t* sb = sdk + TS * d_k;
  acc_t* sdb = sb + TS;
  const int bh = blockIdx.x, lane = threadIdx.x % 32;
  const int row = blockIdx.y * kRowsPerBlock + threadIdx.x / 32;
  const bool active = row < d_v;
  const int64_t qk_off = (int64_t)bh * T * d_k, v_off = (int64_t)bh * T * d_v;
  q += qk_off;
  k += qk_off;
  v += v_off;
  dy += v_off;
  if (beta != nullptr) beta += (int64_t)bh * T;
  const acc_t* vbar = vbar_in == nullptr ? nullptr : static_cast<const acc_t*>(vbar_in) + v_off;
  acc_t* dq = static_cast<acc_t*>(dq_out) + qk_off;
  acc_t* dk = static_cast<acc_t*>(dk_out) + qk_off;
  acc_t* dv = static_cast<acc_t*>(dv_out) + v_off;
  acc_t* dbeta = dbeta_out == nullptr ? nullptr : static_cast<acc_t*>(dbeta_out) + (int64_t)bh * T;
  const int64_t w_off = ((int64_t)bh * d_v + row) * d_k;
  acc_t W[KPL], dW[KPL];
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    const int c = lane + 32 * j;
    const bool ok = active && c < d_k;
    W[j] = ok ? static_cast<const acc_t*>(WT)[w_off + c] : acc_t(0);
    dW[j] = ok ? static_cast<const acc_t*>(dWT)[w_off + c] : acc_t(0);
  }
  const int n_tiles = (T + TS - 1) / TS;
  for (int tile = n_tiles - 1; tile >= 0; --tile) {
    const int t0 = tile * TS;
    __syncthreads();
    load_tile(q, k, beta, sq, sk, sb, t0, TS, T, d_k);
    for (int e = threadIdx.x; e < TS * d_k; e += blockDim.x) sdq[e] = sdk[e] = acc_t(0);
    for (int s = threadIdx.x; s < TS; s += blockDim.x) sdb[s] = acc_t(0);
    __syncthreads();
    if (active) {
      for (int s = min(TS, T - t0) - 1; s >= 0; --s) {
        const int t = t0 + s;
        const int64_t tv = (int64_t)t * d_v + row;
        acc_t kk[KPL];
        const acc_t dy_t = static_cast<acc_t>(dy[tv]);
#pragma unroll
        for (int j = 0; j < KPL; ++j) {  // y_t = W_t q_t
          const int c = lane + 32 * j;
          kk[j] = c < d_k ? sk[s * d_k + c] : acc_t(0);
          if (c < d_k) {
            dW[j] += dy_t * sq[s * d_k + c];
            atomicAdd(&sdq[s * d_k + c], dy_t * W[j]);
          }
        }
        const acc_t v_t = static_cast<acc_t>(v[tv]);
        const acc_t a = DELTA ? vbar[tv] : acc_t(0);
        const acc_t d = DELTA ? sb[s] * (v_t - a) : v_t;  // the value written at step t
        acc_t dd = 0;
#pragma unroll
        for (int j = 0; j < KPL; ++j) dd += dW[j] * kk[j];
        dd = warp_sum(dd);  // d loss / d d
        const acc_t da = DELTA ? -sb[s] * dd : acc_t(0);  // d loss / d v̄_t
#pragma unroll
        for (int j = 0; j < KPL; ++j) {
          const int c = lane + 32 * j;
          W[j] -= d * kk[j];  // undo the write: W_{t-1}
          if (c < d_k) atomicAdd(&sdk[s * d_k + c], d * dW[j] + da * W[j]);  // from d k^T and v̄ = W_{t-1} k
          dW[j] += da * kk[j];
        }
        if (lane == 0) {
          dv[tv] = DELTA ? sb[s] * dd : dd;
          if (DELTA) atomicAdd(&sdb[s], dd * (v_t - a));
        }
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < TS * d_k; e += blockDim.x) {
      const int t = t0 + e / d_k;
      if (t < T) {
        atomicAdd(&dq[(int64_t)t * d_k + e % d_k], sdq[e]);
        atomicAdd(&dk[(int64_t)t * d_k + e % d_k], sdk[e]);
      }
    }
    if (DELTA)
      for (int s = threadIdx.x; s < TS; s += blockDim.x)
        if (t0 + s < T) atomicAdd(&dbeta[t0 + s], sdb[s]);
  }
  if (active) {
#pragma unroll
    for (int j = 0; j < KPL; ++j)
      if (lane + 32 * j < d_k) static_cast<acc_t*>(dW0_out)[w_off + lane + 32 * j] = dW[j];
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, bool delta) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "fast_weight: inputs must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "fast_weight: q, k (B,H,T,d_k), v (B,H,T,d_v)");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), "fast_weight: v shape");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 128, "fast_weight: d_k must be in [1, 128]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "fast_weight: inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "fast_weight: dtypes differ");
  if (delta) {
    TORCH_CHECK(beta.is_cuda() && beta.is_contiguous() && beta.scalar_type() == q.scalar_type(), "fast_weight: beta");
    TORCH_CHECK(beta.dim() == 3 && beta.size(0) == q.size(0) && beta.size(1) == q.size(1) && beta.size(2) == q.size(2),
                "fast_weight: beta must be (B,H,T)");
  }
}

template <typename F>
void dispatch_kpl(int d_k, F&& f) {
  switch ((d_k + 31) / 32) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
}

}  // namespace

// Returns y (input dtype), W_T (fp32, or fp64 for fp64 inputs), v̄ (same, delta rule; empty for the sum rule).
std::vector<at::Tensor> fast_weight_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor W0,
                                            bool delta) {
  check_inputs(q, k, v, beta, delta);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t BH = q.size(0) * q.size(1);
  const int T = q.size(2), d_k = q.size(3), d_v = v.size(3);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto y = at::empty_like(v);
  auto W = at::empty({q.size(0), q.size(1), d_v, d_k}, q.options().dtype(acc));
  auto vbar = delta ? at::empty({q.size(0), q.size(1), T, d_v}, q.options().dtype(acc)) : at::empty({0}, q.options());
  if (W0.defined() && W0.numel() > 0) {
    TORCH_CHECK(W0.is_cuda() && W0.sizes() == W.sizes(), "fast_weight: W0 must be (B,H,d_v,d_k)");
    W0 = W0.to(acc).contiguous();
  } else {
    W0 = at::Tensor();
  }
  if (BH == 0 || d_v == 0) return {y, W.zero_(), vbar};
  const dim3 grid(BH, (d_v + kRowsPerBlock - 1) / kRowsPerBlock), block(32 * kRowsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fast_weight_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = (2 * tile_steps<acc_t>() * d_k + tile_steps<acc_t>()) * sizeof(acc_t);
    const float* w0f = W0.defined() && acc == at::kFloat ? W0.data_ptr<float>() : nullptr;
    const double* w0d = W0.defined() && acc == at::kDouble ? W0.data_ptr<double>() : nullptr;
    dispatch_kpl(d_k, [&](auto kpl) {
      auto launch = [&](auto kernel) {
        kernel<<<grid, block, smem, stream>>>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                              delta ? beta.data_ptr<scalar_t>() : nullptr, w0f, w0d,
                                              y.data_ptr<scalar_t>(), delta ? vbar.data_ptr() : nullptr, W.data_ptr(),
                                              T, d_k, d_v);
      };
      if (delta) launch(fast_weight_forward_kernel<scalar_t, decltype(kpl)::value, true>);
      else launch(fast_weight_forward_kernel<scalar_t, decltype(kpl)::value, false>);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, W, vbar};
}

// Returns dq, dk, dv, dbeta (fp32, or fp64; dbeta empty for the sum rule) and dW0.
std::vector<at::Tensor> fast_weight_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta,
                                             at::Tensor vbar, at::Tensor W, at::Tensor dy, at::Tensor dW,
                                             bool delta) {
  check_inputs(q, k, v, beta, delta);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t BH = q.size(0) * q.size(1);
  const int T = q.size(2), d_k = q.size(3), d_v = v.size(3);
  const auto acc = W.scalar_type();
  dy = dy.to(q.scalar_type()).contiguous();
  dW = dW.defined() && dW.numel() > 0 ? dW.to(acc).contiguous() : at::zeros_like(W);
  auto dq = at::zeros(q.sizes(), q.options().dtype(acc));
  auto dk = at::zeros(q.sizes(), q.options().dtype(acc));
  auto dv = at::zeros(v.sizes(), v.options().dtype(acc));
  auto dbeta = delta ? at::zeros({q.size(0), q.size(1), T}, q.options().dtype(acc)) : at::empty({0}, q.options());
  auto dW0 = at::empty_like(W);
  if (BH == 0 || d_v == 0) return {dq, dk, dv, dbeta, dW0.zero_()};
  const dim3 grid(BH, (d_v + kRowsPerBlock - 1) / kRowsPerBlock), block(32 * kRowsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fast_weight_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = (4 * tile_steps<acc_t>() * d_k + 2 * tile_steps<acc_t>()) * sizeof(acc_t);
    dispatch_kpl(d_k, [&](auto kpl) {
      auto launch = [&](auto kernel) {
        kernel<<<grid, block, smem, stream>>>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                              delta ? beta.data_ptr<scalar_t>() : nullptr,
                                              delta ? vbar.data_ptr() : nullptr, W.data_ptr(), dy.data_ptr<scalar_t>(),
                                              dW.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                              delta ? dbeta.data_ptr() : nullptr, dW0.data_ptr(), T, d_k, d_v);
      };
      if (delta) launch(fast_weight_backward_kernel<scalar_t, decltype(kpl)::value, true>);
      else launch(fast_weight_backward_kernel<scalar_t, decltype(kpl)::value, false>);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, dbeta, dW0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fast_weight_forward, "fast-weight update forward (sum or delta rule)");
  m.def("backward", &fast_weight_backward, "fast-weight update backward (sum or delta rule)");
}
