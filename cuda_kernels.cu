// Fast-weight update kernels shared by the FWP scripts: the sum rule and the delta rule in their
// recurrent form, forward and backward, JIT-loaded with torch.utils.cpp_extension.load. Further down, each
// with its own notes: the recurrent FWPs of rfwp.py, and the chunkwise delta rule's pass over chunks.
//
// Per batch b and head h, W is d_v x d_k (fp32, or fp64 for fp64 inputs), starting from W0:
//   sum:   W_t = W_{t-1} + v_t k_t^T                          y_t = W_t q_t
//   delta: W_t = W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T    y_t = W_t q_t
//   gated: W_t = alpha_t W_{t-1} + beta_t (v_t - alpha_t W_{t-1} k_t) k_t^T, alpha_t = exp(g_t)   (its notes below)
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
// memory and added to global fp32 buffers once per block and tile. Inputs fp32, bf16, fp16 or fp64; gradients for q,
// k, v, beta and W0. The sum rule is linear_transformer.py's --impl kernel on CUDA, its denominator one more value row.
//
// Status. The sum and delta rules have run on an NVIDIA H200 (bash .ci/gpu_check; RESULTS.md). The gated delta rule,
// the recurrent FWPs and the chunk pass compile (test_all.py compiles this file to PTX for sm_90 wherever nvcc is),
// and their device code passes its tests on CPU threads (test_all.py runs each CUDA thread as a fiber, a block's warps
// on at most 4 OS threads, __syncthreads and shuffles waiting as on a GPU, the fibers between two of them in a random
// order, so that a missing __syncthreads shows), but they have not yet run on a GPU: the host code, the GPU's fp32
// rounding and their speed are for the CUDA tests, which skip without one. Each script loads this file on first use
// (kernels("cuda")), under a module name holding a hash of its source.
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

// The gated delta rule (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", arXiv 2412.06464; delta_net.py --gate),
// one warp per row of W as above. Undoing a write would divide by alpha_t, which underflows as alpha_t -> 0, so the
// backward never does: the forward saves each row of W at the start of every tile of TS steps (a (B, H, n_tiles, d_v,
// d_k) tensor: d_k / TS times the size of v), and the backward, tile by tile in reverse, recomputes the tile's states
// W_{t-1} from it in registers (loops over the tile fully unrolled) and walks them back. Per step, with
// a_i = W_{t-1,i} . k, u_i = beta (v_i - alpha a_i) and dM = dL/dW_t (the read's dy_i q added), row i gives
//   du_i = dM_i . k,  dv_i = beta du_i,  dbeta += du_i (v_i - alpha a_i),  dk += u_i dM_i - alpha beta du_i W_{t-1,i},
//   dg += alpha (dM_i . W_{t-1,i} - beta du_i a_i),  dL/dW_{t-1,i} = alpha (dM_i - beta du_i k),  dq += dy_i W_{t,i}
// (cpu_kernels.cpp's gated rule, the same formulas). alpha_t = 0 (g_t = -inf) is exact. nvcc -Xptxas -v for sm_90:
// no register spills at any width or dtype (the backward uses up to 168 registers a thread, the forward up to 56).

// alpha_t = exp(g_t) for t in [t0, t0 + TS) into shared memory, 1 beyond T.
template <typename scalar_t, typename acc_t>
__device__ void load_alpha(const scalar_t* g, acc_t* sa, int t0, int TS, int T) {
  for (int s = threadIdx.x; s < TS; s += blockDim.x) sa[s] = t0 + s < T ? exp(static_cast<acc_t>(g[t0 + s])) : acc_t(1);
}

// grid (B*H, ceil(d_v / kRowsPerBlock)); block kRowsPerBlock warps. W0 (acc_t) or null; W_tiles, W_out acc_t.
template <typename scalar_t, int KPL>
__global__ void gated_delta_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                           const scalar_t* __restrict__ v, const scalar_t* __restrict__ beta,
                                           const scalar_t* __restrict__ g, const void* __restrict__ W0,
                                           scalar_t* __restrict__ y, void* __restrict__ W_tiles,
                                           void* __restrict__ W_out, int T, int d_k, int d_v) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TS = tile_steps<acc_t>();
  extern __shared__ unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sk = sq + TS * d_k;
  acc_t* sb = sk + TS * d_k;
  acc_t* sa = sb + TS;
  const int bh = blockIdx.x, lane = threadIdx.x % 32;
  const int row = blockIdx.y * kRowsPerBlock + threadIdx.x / 32;
  const bool active = row < d_v;
  const int n_tiles = (T + TS - 1) / TS;
  q += (int64_t)bh * T * d_k;
  k += (int64_t)bh * T * d_k;
  v += (int64_t)bh * T * d_v;
  y += (int64_t)bh * T * d_v;
  beta += (int64_t)bh * T;
  g += (int64_t)bh * T;
  const int64_t w_off = ((int64_t)bh * d_v + row) * d_k;
  acc_t W[KPL];
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    const int c = lane + 32 * j;
    W[j] = active && c < d_k && W0 != nullptr ? static_cast<const acc_t*>(W0)[w_off + c] : acc_t(0);
  }
  for (int t0 = 0; t0 < T; t0 += TS) {
    __syncthreads();
    load_tile(q, k, beta, sq, sk, sb, t0, TS, T, d_k);
    load_alpha(g, sa, t0, TS, T);
    __syncthreads();
    if (!active) continue;
    acc_t* saved = static_cast<acc_t*>(W_tiles) + (((int64_t)bh * n_tiles + t0 / TS) * d_v + row) * d_k;
#pragma unroll
    for (int j = 0; j < KPL; ++j)
      if (lane + 32 * j < d_k) saved[lane + 32 * j] = W[j];
    for (int s = 0; s < TS && t0 + s < T; ++s) {
      const int t = t0 + s;
      const acc_t alpha = sa[s];
      acc_t kk[KPL], qq[KPL], a = 0;
#pragma unroll
      for (int j = 0; j < KPL; ++j) {
        const int c = lane + 32 * j;
        kk[j] = c < d_k ? sk[s * d_k + c] : acc_t(0);
        qq[j] = c < d_k ? sq[s * d_k + c] : acc_t(0);
        W[j] *= alpha;
        a += W[j] * kk[j];
      }
      a = warp_sum(a);  // v̄_t[row] = alpha_t W_{t-1}[row] . k_t
      const acc_t d = sb[s] * (static_cast<acc_t>(v[(int64_t)t * d_v + row]) - a);
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

// The saved tile starts W_tiles, dy, dWT (acc_t) -> dq, dk, dv, dbeta, dg, dW0 (acc_t; dq, dk, dbeta, dg zeroed by
// the caller: the rows add to them).
template <typename scalar_t, int KPL>
__global__ void gated_delta_backward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                            const scalar_t* __restrict__ v, const scalar_t* __restrict__ beta,
                                            const scalar_t* __restrict__ g, const void* __restrict__ W_tiles,
                                            const scalar_t* __restrict__ dy, const void* __restrict__ dWT,
                                            void* __restrict__ dq_out, void* __restrict__ dk_out,
                                            void* __restrict__ dv_out, void* __restrict__ dbeta_out,
                                            void* __restrict__ dg_out, void* __restrict__ dW0_out, int T, int d_k,
                                            int d_v) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TS = tile_steps<acc_t>();
  extern __shared__ unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sk = sq + TS * d_k;
  acc_t* sdq = sk + TS * d_k;
  acc_t* sdk = sdq + TS * d_k;
  acc_t* sb = sdk + TS * d_k;
  acc_t* sa = sb + TS;
  acc_t* sdb = sa + TS;
  acc_t* sdg = sdb + TS;
  const int bh = blockIdx.x, lane = threadIdx.x % 32;
  const int row = blockIdx.y * kRowsPerBlock + threadIdx.x / 32;
  const bool active = row < d_v;
  const int n_tiles = (T + TS - 1) / TS;
  const int64_t qk_off = (int64_t)bh * T * d_k, v_off = (int64_t)bh * T * d_v;
  q += qk_off;
  k += qk_off;
  v += v_off;
  dy += v_off;
  beta += (int64_t)bh * T;
  g += (int64_t)bh * T;
  acc_t* dq = static_cast<acc_t*>(dq_out) + qk_off;
  acc_t* dk = static_cast<acc_t*>(dk_out) + qk_off;
  acc_t* dv = static_cast<acc_t*>(dv_out) + v_off;
  acc_t* dbeta = static_cast<acc_t*>(dbeta_out) + (int64_t)bh * T;
  acc_t* dg = static_cast<acc_t*>(dg_out) + (int64_t)bh * T;
  const int64_t w_off = ((int64_t)bh * d_v + row) * d_k;
  acc_t dW[KPL];
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    const int c = lane + 32 * j;
    dW[j] = active && c < d_k ? static_cast<const acc_t*>(dWT)[w_off + c] : acc_t(0);
  }
  for (int tile = n_tiles - 1; tile >= 0; --tile) {
    const int t0 = tile * TS;
    __syncthreads();
    load_tile(q, k, beta, sq, sk, sb, t0, TS, T, d_k);
    load_alpha(g, sa, t0, TS, T);
    for (int e = threadIdx.x; e < TS * d_k; e += blockDim.x) sdq[e] = sdk[e] = acc_t(0);
    for (int s = threadIdx.x; s < TS; s += blockDim.x) sdb[s] = sdg[s] = acc_t(0);
    __syncthreads();
    if (active) {
      const acc_t* saved = static_cast<const acc_t*>(W_tiles) + (((int64_t)bh * n_tiles + tile) * d_v + row) * d_k;
      acc_t W[KPL], Wp[TS][KPL];  // W; Wp[s] = W_{t0 + s - 1}, the state before step t0 + s
#pragma unroll
      for (int j = 0; j < KPL; ++j) W[j] = lane + 32 * j < d_k ? saved[lane + 32 * j] : acc_t(0);
#pragma unroll
      for (int s = 0; s < TS; ++s) {  // recompute the tile's states
        if (t0 + s < T) {
          const acc_t alpha = sa[s];
          acc_t kk[KPL], a = 0;
#pragma unroll
          for (int j = 0; j < KPL; ++j) {
            const int c = lane + 32 * j;
            kk[j] = c < d_k ? sk[s * d_k + c] : acc_t(0);
            Wp[s][j] = W[j];
            W[j] *= alpha;
            a += W[j] * kk[j];
          }
          a = warp_sum(a);
          const acc_t d = sb[s] * (static_cast<acc_t>(v[(int64_t)(t0 + s) * d_v + row]) - a);
#pragma unroll
          for (int j = 0; j < KPL; ++j) W[j] += d * kk[j];
        }
      }
#pragma unroll
      for (int s = TS - 1; s >= 0; --s) {  // and walk them back; W = W_t
        if (t0 + s < T) {
          const int64_t tv = (int64_t)(t0 + s) * d_v + row;
          const acc_t alpha = sa[s], b = sb[s], dy_t = static_cast<acc_t>(dy[tv]);
          acc_t kk[KPL], a = 0, du = 0, m = 0;
#pragma unroll
          for (int j = 0; j < KPL; ++j) {  // y_t = W_t q_t
            const int c = lane + 32 * j;
            kk[j] = c < d_k ? sk[s * d_k + c] : acc_t(0);
            if (c < d_k) {
              dW[j] += dy_t * sq[s * d_k + c];
              atomicAdd(&sdq[s * d_k + c], dy_t * W[j]);
            }
            a += Wp[s][j] * kk[j];
            du += dW[j] * kk[j];
            m += dW[j] * Wp[s][j];
          }
          a = warp_sum(a);
          du = warp_sum(du);
          m = warp_sum(m);
          const acc_t r = static_cast<acc_t>(v[tv]) - alpha * a;  // v_t - v̄_t
#pragma unroll
          for (int j = 0; j < KPL; ++j) {
            const int c = lane + 32 * j;
            if (c < d_k) atomicAdd(&sdk[s * d_k + c], b * r * dW[j] - alpha * b * du * Wp[s][j]);
            dW[j] = alpha * (dW[j] - b * du * kk[j]);  // dL/dW_{t-1}
            W[j] = Wp[s][j];
          }
          if (lane == 0) {
            dv[tv] = b * du;
            atomicAdd(&sdb[s], du * r);
            atomicAdd(&sdg[s], alpha * (m - b * du * a));
          }
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
    for (int s = threadIdx.x; s < TS; s += blockDim.x)
      if (t0 + s < T) {
        atomicAdd(&dbeta[t0 + s], sdb[s]);
        atomicAdd(&dg[t0 + s], sdg[s]);
      }
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

// The gated delta rule: q, k (B, H, T, d_k), v (B, H, T, d_v), beta, g (B, H, T) of one dtype, W0 (B, H, d_v, d_k) or
// empty -> y (input dtype), W_T and the state at the start of every tile of TS steps (B, H, ceil(T / TS), d_v, d_k;
// TS 16, 8 for fp64), both fp32 (fp64 for fp64 inputs).
std::vector<at::Tensor> gated_delta_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor g,
                                            at::Tensor W0) {
  check_inputs(q, k, v, beta, true);
  TORCH_CHECK(g.is_cuda() && g.is_contiguous() && g.scalar_type() == q.scalar_type() && g.sizes() == beta.sizes(),
              "gated_delta: g must be a contiguous (B,H,T) tensor of the inputs' dtype");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t BH = q.size(0) * q.size(1);
  const int T = q.size(2), d_k = q.size(3), d_v = v.size(3);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int TS = acc == at::kDouble ? tile_steps<double>() : tile_steps<float>(), n_tiles = (T + TS - 1) / TS;
  auto y = at::empty_like(v);
  auto W = at::empty({q.size(0), q.size(1), d_v, d_k}, q.options().dtype(acc));
  auto W_tiles = at::empty({q.size(0), q.size(1), n_tiles, d_v, d_k}, q.options().dtype(acc));
  const bool has_W0 = W0.defined() && W0.numel() > 0;
  if (has_W0) {
    TORCH_CHECK(W0.is_cuda() && W0.sizes() == W.sizes(), "gated_delta: W0 must be (B,H,d_v,d_k)");
    W0 = W0.to(acc).contiguous();
  }
  if (BH == 0 || d_v == 0) return {y, has_W0 ? W.copy_(W0) : W.zero_(), W_tiles};
  const dim3 grid(BH, (d_v + kRowsPerBlock - 1) / kRowsPerBlock), block(32 * kRowsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gated_delta_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = (2 * tile_steps<acc_t>() * d_k + 2 * tile_steps<acc_t>()) * sizeof(acc_t);
    dispatch_kpl(d_k, [&](auto kpl) {
      gated_delta_forward_kernel<scalar_t, decltype(kpl)::value><<<grid, block, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>(), has_W0 ? W0.data_ptr() : nullptr, y.data_ptr<scalar_t>(), W_tiles.data_ptr(),
          W.data_ptr(), T, d_k, d_v);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, W, W_tiles};
}

// The inputs, the saved tile starts, dy and dW (dL/dW_T, or empty) -> dq, dk, dv, dbeta, dg, dW0 (fp32, or fp64).
std::vector<at::Tensor> gated_delta_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor g,
                                             at::Tensor W_tiles, at::Tensor dy, at::Tensor dW) {
  check_inputs(q, k, v, beta, true);
  TORCH_CHECK(g.is_cuda() && g.is_contiguous() && g.scalar_type() == q.scalar_type() && g.sizes() == beta.sizes(),
              "gated_delta: g must be a contiguous (B,H,T) tensor of the inputs' dtype");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t BH = q.size(0) * q.size(1);
  const int T = q.size(2), d_k = q.size(3), d_v = v.size(3);
  const auto acc = W_tiles.scalar_type();
  W_tiles = W_tiles.contiguous();
  dy = dy.to(q.scalar_type()).contiguous();
  dW = dW.defined() && dW.numel() > 0 ? dW.to(acc).contiguous()
                                      : at::zeros({q.size(0), q.size(1), d_v, d_k}, q.options().dtype(acc));
  auto dq = at::zeros(q.sizes(), q.options().dtype(acc)), dk = at::zeros(q.sizes(), q.options().dtype(acc));
  auto dv = at::zeros(v.sizes(), v.options().dtype(acc));
  auto dbeta = at::zeros(beta.sizes(), q.options().dtype(acc)), dg = at::zeros(beta.sizes(), q.options().dtype(acc));
  auto dW0 = at::empty_like(dW);
  if (BH == 0 || d_v == 0) return {dq, dk, dv, dbeta, dg, dW0.copy_(dW)};
  const dim3 grid(BH, (d_v + kRowsPerBlock - 1) / kRowsPerBlock), block(32 * kRowsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gated_delta_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = (4 * tile_steps<acc_t>() * d_k + 4 * tile_steps<acc_t>()) * sizeof(acc_t);
    dispatch_kpl(d_k, [&](auto kpl) {
      gated_delta_backward_kernel<scalar_t, decltype(kpl)::value><<<grid, block, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>(), W_tiles.data_ptr(), dy.data_ptr<scalar_t>(), dW.data_ptr(), dq.data_ptr(),
          dk.data_ptr(), dv.data_ptr(), dbeta.data_ptr(), dg.data_ptr(), dW0.data_ptr(), T, d_k, d_v);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, dbeta, dg, dW0};
}

// ---------------------------------------------------------------------------------------------
// The recurrent FWPs of rfwp.py (Irie et al. 2021, eq. 17-32), one thread block per (b, h), forward and backward:
//   Delta RNN   R_t = R_{t-1} + beta_t (v_t - R_{t-1} k_t) k_t^T;  y_t = z_t + R_t softmax(y_{t-1})
//   Delta LSTM  per gate g in (i, u, o): R^g by the delta rule; a^g = z^g_t + R^g_t softmax(h_{t-1});
//               c_t = sigmoid(a^i) a^u + (1 - sigmoid(a^i)) c_{t-1};  h_t = sigmoid(a^o) c_t
//   RDN         s = tanh(y_{t-1}); q = softmax(q_t + R_q s), k = softmax(k_t + R_k s), v = v_t + R_v s,
//               beta = sigmoid(b_t + r_b . s); W by the delta rule; y_t = W_t q
// z, k, v, beta of the Delta RNN and LSTM and q, k, v, b of the RDN come from the layer's input (computed in
// PyTorch); R_q, R_k, R_v, r_b are slow weights (their gradients are sums over b and t of outer products of the
// per-step gradients this kernel returns with s_t, done in PyTorch).
//
// The recurrence couples all rows of a head's matrix through y_{t-1}, so one block owns a head. Warp w of the NW
// warps holds rows w, w + NW, ... (RPW of them) and lane l columns l, l + 32, ... (KPL of them) of every d x d
// matrix, in registers. A vector is held either by rows (the value of each of the warp's rows, the same in every
// lane) or by columns (lane l holds entries l + 32 j). M x is a warp sum per row; M^T g is a sum over warps, through
// per-warp partials in shared memory, which every warp adds up after one __syncthreads (so every warp holds the
// result by columns; col_to_row moves one entry into the rows layout with a shuffle).
//
// Backward: no matrix is stored per step. The forward saves v̄_t = R_{t-1} k_t (and the vectors the backward needs
// again), the backward starts from the final matrices and undoes each write exactly as written,
// R_{t-1} = R_t - beta_t (v_t - v̄_t) k_t^T, as the delta kernel above does.
//
// d <= 128, any B H and T (T = 1 for RL). Where a backward's shared memory exceeds the GPU's (the Delta LSTM at d 128
// in fp64, or at large d on GPUs with less than an H100's), the layer uses the loop (recurrent_backward_smem).
// nvcc -Xptxas -v for sm_90: no register spills in fp32 up to d = 32 (the paper's heads are 16 wide), a few bytes
// for the Delta LSTM backward up to d = 64, spills at d = 128.

namespace {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
  for (int offset = 16; offset > 0; offset /= 2) x = max(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) { return acc_t(1) / (acc_t(1) + exp(-x)); }

// The layout of one head's d x d matrices in a block of NW = blockDim.x / 32 warps.
template <int RPW, int KPL>
struct Layout {
  int d, nw, warp, lane;
  __device__ explicit Layout(int d_) : d(d_), nw(blockDim.x / 32), warp(threadIdx.x / 32), lane(threadIdx.x % 32) {}
  __device__ int row(int i) const { return warp + nw * i; }
  __device__ int col(int j) const { return lane + 32 * j; }
  __device__ bool row_ok(int i) const { return row(i) < d; }
  __device__ bool col_ok(int j) const { return col(j) < d; }
};

// Loads and stores; entries outside d read as zero and are not written.
template <int RPW, int KPL, typename T, typename acc_t>
__device__ void load_cols(const Layout<RPW, KPL>& L, const T* x, acc_t (&out)[KPL]) {
#pragma unroll
  for (int j = 0; j < KPL; ++j) out[j] = L.col_ok(j) ? static_cast<acc_t>(x[L.col(j)]) : acc_t(0);
}

template <int RPW, int KPL, typename T, typename acc_t>
__device__ void load_rows(const Layout<RPW, KPL>& L, const T* x, acc_t (&out)[RPW]) {
#pragma unroll
  for (int i = 0; i < RPW; ++i) out[i] = L.row_ok(i) ? static_cast<acc_t>(x[L.row(i)]) : acc_t(0);
}

template <int RPW, int KPL, typename T, typename acc_t>
__device__ void store_rows(const Layout<RPW, KPL>& L, T* x, const acc_t (&in)[RPW]) {  // lane 0 writes
  if (L.lane != 0 || x == nullptr) return;
#pragma unroll
  for (int i = 0; i < RPW; ++i)
    if (L.row_ok(i)) x[L.row(i)] = static_cast<T>(in[i]);
}

template <int RPW, int KPL, typename acc_t>
__device__ void store_cols(const Layout<RPW, KPL>& L, acc_t* x, const acc_t (&in)[KPL]) {  // warp 0 writes
  if (L.warp != 0 || x == nullptr) return;
#pragma unroll
  for (int j = 0; j < KPL; ++j)
    if (L.col_ok(j)) x[L.col(j)] = in[j];
}

template <int RPW, int KPL, typename acc_t>
__device__ void load_tile(const Layout<RPW, KPL>& L, const acc_t* M, acc_t (&out)[RPW][KPL]) {  // M (d, d)
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int j = 0; j < KPL; ++j)
      out[i][j] = L.row_ok(i) && L.col_ok(j) ? M[(int64_t)L.row(i) * L.d + L.col(j)] : acc_t(0);
}

template <int RPW, int KPL, typename acc_t>
__device__ void store_tile(const Layout<RPW, KPL>& L, acc_t* M, const acc_t (&in)[RPW][KPL]) {
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int j = 0; j < KPL; ++j)
      if (L.row_ok(i) && L.col_ok(j)) M[(int64_t)L.row(i) * L.d + L.col(j)] = in[i][j];
}

// out = M x (x by columns, out by rows)
template <int RPW, int KPL, typename acc_t>
__device__ void mat_vec(const acc_t (&M)[RPW][KPL], const acc_t (&x)[KPL], acc_t (&out)[RPW]) {
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    acc_t s = 0;
#pragma unroll
    for (int j = 0; j < KPL; ++j) s += M[i][j] * x[j];
    out[i] = warp_sum(s);
  }
}

// out += this warp's rows of M^T g (g by rows, out by columns): a partial, summed over warps by sum_partials
template <int RPW, int KPL, typename acc_t>
__device__ void add_mat_t_vec(const acc_t (&M)[RPW][KPL], const acc_t (&g)[RPW], acc_t (&out)[KPL]) {
#pragma unroll
  for (int j = 0; j < KPL; ++j)
#pragma unroll
    for (int i = 0; i < RPW; ++i) out[j] += M[i][j] * g[i];
}

// M += a x^T (a by rows, x by columns)
template <int RPW, int KPL, typename acc_t>
__device__ void add_outer(acc_t (&M)[RPW][KPL], const acc_t (&a)[RPW], const acc_t (&x)[KPL]) {
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int j = 0; j < KPL; ++j) M[i][j] += a[i] * x[j];
}

template <int RPW, int KPL, typename acc_t>
__device__ void store_partial(const Layout<RPW, KPL>& L, acc_t* part, const acc_t (&x)[KPL]) {  // part (NW, d)
#pragma unroll
  for (int j = 0; j < KPL; ++j)
    if (L.col_ok(j)) part[L.warp * L.d + L.col(j)] = x[j];
}

template <int RPW, int KPL, typename acc_t>
__device__ void sum_partials(const Layout<RPW, KPL>& L, const acc_t* part, acc_t (&out)[KPL]) {
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    out[j] = 0;
    if (L.col_ok(j))
      for (int w = 0; w < L.nw; ++w) out[j] += part[w * L.d + L.col(j)];
  }
}

template <int RPW, int KPL, typename acc_t>
__device__ acc_t sum_warps(const Layout<RPW, KPL>& L, const acc_t* part) {  // part (NW,): one scalar per warp
  return warp_sum(L.lane < L.nw ? part[L.lane] : acc_t(0));
}

// Entry r of a vector held by columns, in every lane (r is the same in all lanes of the warp).
template <int KPL, typename acc_t>
__device__ acc_t col_to_row(const acc_t (&x)[KPL], int r) {
  acc_t out = 0;
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    const acc_t e = __shfl_sync(0xffffffff, x[j], r % 32);
    if (j == r / 32) out = e;
  }
  return out;
}

template <int RPW, int KPL, typename acc_t>
__device__ void cols_to_rows(const Layout<RPW, KPL>& L, const acc_t (&x)[KPL], acc_t (&out)[RPW]) {
#pragma unroll
  for (int i = 0; i < RPW; ++i) out[i] = col_to_row(x, L.row(i));
}

// softmax over the d valid columns, in place
template <int RPW, int KPL, typename acc_t>
__device__ void softmax_cols(const Layout<RPW, KPL>& L, acc_t (&x)[KPL]) {
  acc_t m = -INFINITY;
#pragma unroll
  for (int j = 0; j < KPL; ++j)
    if (L.col_ok(j)) m = max(m, x[j]);
  m = warp_max(m);
  acc_t s = 0;
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    x[j] = L.col_ok(j) ? exp(x[j] - m) : acc_t(0);
    s += x[j];
  }
  s = warp_sum(s);
#pragma unroll
  for (int j = 0; j < KPL; ++j) x[j] /= s;
}

// the l2 map (qk_map l2) over the d valid columns, in place: x <- scale silu(x) / |silu(x)| (|.| at least 1e-12)
template <int RPW, int KPL, typename acc_t>
__device__ void l2_cols(const Layout<RPW, KPL>& L, acc_t (&x)[KPL], acc_t scale) {
  acc_t s = 0;
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    x[j] = L.col_ok(j) ? x[j] * sigmoid(x[j]) : acc_t(0);
    s += x[j] * x[j];
  }
  s = warp_sum(s);
  const acc_t r = scale / (sqrt(s) > acc_t(1e-12) ? sqrt(s) : acc_t(1e-12));
#pragma unroll
  for (int j = 0; j < KPL; ++j) x[j] *= r;
}

// x the pre-activation, dp = dL/d(l2 map of x) (by columns) -> dL/dx: with f = silu(x), n = f / |f|,
// dL/df = scale (dp - n (n . dp)) / |f|, times silu'(x)
template <int RPW, int KPL, typename acc_t>
__device__ void l2_backward(const Layout<RPW, KPL>& L, const acc_t (&x)[KPL], const acc_t (&dp)[KPL],
                            acc_t (&dx)[KPL], acc_t scale) {
  acc_t f[KPL], s = 0, nd = 0;
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    f[j] = L.col_ok(j) ? x[j] * sigmoid(x[j]) : acc_t(0);
    s += f[j] * f[j];
  }
  s = warp_sum(s);
  const acc_t r = sqrt(s) > acc_t(1e-12) ? sqrt(s) : acc_t(1e-12);
#pragma unroll
  for (int j = 0; j < KPL; ++j) nd += f[j] / r * dp[j];
  nd = warp_sum(nd);
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    const acc_t sg = sigmoid(x[j]);
    dx[j] = L.col_ok(j) ? scale * (dp[j] - f[j] / r * nd) / r * sg * (1 + x[j] * (1 - sg)) : acc_t(0);
  }
}

// p = softmax(x), dp = dL/dp (by columns) -> dL/dx = p (dp - p . dp)
template <int KPL, typename acc_t>
__device__ void softmax_backward(const acc_t (&p)[KPL], const acc_t (&dp)[KPL], acc_t (&dx)[KPL]) {
  acc_t s = 0;
#pragma unroll
  for (int j = 0; j < KPL; ++j) s += p[j] * dp[j];
  s = warp_sum(s);
#pragma unroll
  for (int j = 0; j < KPL; ++j) dx[j] = p[j] * (dp[j] - s);
}

// The delta-rule write M <- M + beta (v - v̄) k^T with v̄ = M k (k by columns, v and v̄ by rows).
template <int RPW, int KPL, typename acc_t>
__device__ void delta_write(acc_t (&M)[RPW][KPL], const acc_t (&k)[KPL], const acc_t (&v)[RPW], acc_t beta,
                            acc_t (&v_bar)[RPW]) {
  mat_vec(M, k, v_bar);
  acc_t u[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) u[i] = beta * (v[i] - v_bar[i]);
  add_outer(M, u, k);
}

// Its backward, given M = M_t and dM = dL/dM_t: undoes the write (M <- M_{t-1}, dM <- dL/dM_{t-1}), sets dv
// (by rows), adds this warp's part of dL/dk to dk (by columns) and of dL/dbeta to dbeta.
template <int RPW, int KPL, typename acc_t>
__device__ void delta_write_backward(acc_t (&M)[RPW][KPL], acc_t (&dM)[RPW][KPL], const acc_t (&k)[KPL],
                                     const acc_t (&v)[RPW], const acc_t (&v_bar)[RPW], acc_t beta, acc_t (&dv)[RPW],
                                     acc_t (&dk)[KPL], acc_t& dbeta) {
  acc_t u[RPW], du[RPW], dv_bar[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) u[i] = beta * (v[i] - v_bar[i]);  // the value written, M_t = M_{t-1} + u k^T
  mat_vec(dM, k, du);
  add_mat_t_vec(dM, u, dk);
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    dv[i] = beta * du[i];
    dbeta += du[i] * (v[i] - v_bar[i]);
    dv_bar[i] = -beta * du[i];
    u[i] = -u[i];
  }
  add_outer(M, u, k);        // M_{t-1}
  add_outer(dM, dv_bar, k);  // through v̄ = M_{t-1} k
  add_mat_t_vec(M, dv_bar, dk);
}

// ---- Delta RNN. Per (b, h): z, k, v (T, d), beta (T); R (d, d); y (d). Block NW warps; shared 2 d.
template <typename scalar_t, int RPW, int KPL>
__global__ void __launch_bounds__(1024)
    delta_rnn_forward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ k,
                             const scalar_t* __restrict__ v, const scalar_t* __restrict__ beta,
                             const acc_type<scalar_t>* __restrict__ R0, const acc_type<scalar_t>* __restrict__ y0,
                             acc_type<scalar_t>* __restrict__ y_out, acc_type<scalar_t>* __restrict__ R_out,
                             acc_type<scalar_t>* __restrict__ v_bar_out, int T, int d) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* ybuf = reinterpret_cast<acc_t*>(smem_raw);  // y_{t-1}, y_t (alternating)
  const Layout<RPW, KPL> L(d);
  const int64_t bh = blockIdx.x, seq = bh * T * d;
  acc_t R[RPW][KPL];
  load_tile(L, R0 + bh * d * d, R);
  for (int c = threadIdx.x; c < d; c += blockDim.x) ybuf[c] = y0[bh * d + c];
  __syncthreads();
  for (int t = 0; t < T; ++t) {
    const int64_t o = seq + (int64_t)t * d;
    acc_t kk[KPL], p[KPL], vv[RPW], zz[RPW], v_bar[RPW], y[RPW];
    load_cols(L, k + o, kk);
    load_rows(L, v + o, vv);
    load_rows(L, z + o, zz);
    load_cols(L, ybuf + (t % 2) * d, p);
    softmax_cols(L, p);  // softmax(y_{t-1})
    delta_write(R, kk, vv, static_cast<acc_t>(beta[bh * T + t]), v_bar);
    mat_vec(R, p, y);
#pragma unroll
    for (int i = 0; i < RPW; ++i) y[i] += zz[i];
    store_rows(L, ybuf + ((t + 1) % 2) * d, y);
    store_rows(L, y_out + o, y);
    store_rows(L, v_bar_out == nullptr ? nullptr : v_bar_out + o, v_bar);
    __syncthreads();
  }
  store_tile(L, R_out + bh * d * d, R);
}

// dy: dL/dy_t for every t (the final state's gradient added at t = T - 1). Shared 2 (2 NW d + NW).
template <typename scalar_t, int RPW, int KPL>
__global__ void __launch_bounds__(1024)
    delta_rnn_backward_kernel(const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                              const scalar_t* __restrict__ beta, const acc_type<scalar_t>* __restrict__ v_bar_in,
                              const acc_type<scalar_t>* __restrict__ y_out, const acc_type<scalar_t>* __restrict__ y0,
                              const acc_type<scalar_t>* __restrict__ RT, const acc_type<scalar_t>* __restrict__ dy,
                              const acc_type<scalar_t>* __restrict__ dRT, acc_type<scalar_t>* __restrict__ dz,
                              acc_type<scalar_t>* __restrict__ dk, acc_type<scalar_t>* __restrict__ dv,
                              acc_type<scalar_t>* __restrict__ dbeta, acc_type<scalar_t>* __restrict__ dR0,
                              acc_type<scalar_t>* __restrict__ dy0, int T, int d) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  const Layout<RPW, KPL> L(d);
  const int per = 2 * L.nw * d + L.nw;  // one set of partials: R^T dy, dk, dbeta; two sets, alternating
  const int64_t bh = blockIdx.x, seq = bh * T * d;
  acc_t R[RPW][KPL], dR[RPW][KPL], carry[RPW] = {};  // carry: dL/dy_t through step t + 1
  load_tile(L, RT + bh * d * d, R);
  load_tile(L, dRT + bh * d * d, dR);
  for (int t = T - 1; t >= 0; --t) {
    acc_t* part_p = reinterpret_cast<acc_t*>(smem_raw) + (t % 2) * per;
    acc_t* part_k = part_p + L.nw * d;
    acc_t* part_b = part_k + L.nw * d;
    const int64_t o = seq + (int64_t)t * d;
    acc_t kk[KPL], p[KPL], vv[RPW], v_bar[RPW], gy[RPW], dvv[RPW], col_p[KPL] = {}, col_k[KPL] = {}, db = 0;
    load_cols(L, k + o, kk);
    load_rows(L, v + o, vv);
    load_rows(L, v_bar_in + o, v_bar);
    load_rows(L, dy + o, gy);
#pragma unroll
    for (int i = 0; i < RPW; ++i) gy[i] += carry[i];
    store_rows(L, dz + o, gy);  // y_t = z_t + R_t p_t
    load_cols(L, t > 0 ? y_out + o - d : y0 + bh * d, p);
    softmax_cols(L, p);
    add_mat_t_vec(R, gy, col_p);  // dL/dp_t = R_t^T gy
    add_outer(dR, gy, p);
    delta_write_backward(R, dR, kk, vv, v_bar, static_cast<acc_t>(beta[bh * T + t]), dvv, col_k, db);
    store_rows(L, dv + o, dvv);
    store_partial(L, part_p, col_p);
    store_partial(L, part_k, col_k);
    if (L.lane == 0) part_b[L.warp] = db;
    __syncthreads();
    acc_t dp[KPL], dkk[KPL], g[KPL];
    sum_partials(L, part_p, dp);
    sum_partials(L, part_k, dkk);
    const acc_t dbt = sum_warps(L, part_b);
    store_cols(L, dk + o, dkk);
    if (threadIdx.x == 0) dbeta[bh * T + t] = dbt;
    softmax_backward(p, dp, g);  // dL/dy_{t-1} through p_t
    cols_to_rows(L, g, carry);
  }
  store_tile(L, dR0 + bh * d * d, dR);
  store_rows(L, dy0 + bh * d, carry);
}

// ---- Delta LSTM. Block (b, h) of B H; the gates are heads g H + h of 3 H: z, k, v (B, 3H, T, d), beta (B, 3H, T),
// R (B, 3H, d, d); c, h (B, H, d); outputs h_t and c_t (B, H, T, d). Shared 2 d.
template <typename scalar_t, int RPW, int KPL>
__global__ void __launch_bounds__(1024)
    delta_lstm_forward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ k,
                              const scalar_t* __restrict__ v, const scalar_t* __restrict__ beta,
                              const acc_type<scalar_t>* __restrict__ R0, const acc_type<scalar_t>* __restrict__ c0,
                              const acc_type<scalar_t>* __restrict__ h0, acc_type<scalar_t>* __restrict__ h_out,
                              acc_type<scalar_t>* __restrict__ c_out, acc_type<scalar_t>* __restrict__ R_out,
                              acc_type<scalar_t>* __restrict__ v_bar_out, int H, int T, int d) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* hbuf = reinterpret_cast<acc_t*>(smem_raw);  // h_{t-1}, h_t (alternating)
  const Layout<RPW, KPL> L(d);
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, seq = bh * T * d;
  int64_t gate[3];  // the (b, head) index of each gate
#pragma unroll
  for (int g = 0; g < 3; ++g) gate[g] = b * 3 * H + g * H + h;
  acc_t R[3][RPW][KPL], c[RPW];
#pragma unroll
  for (int g = 0; g < 3; ++g) load_tile(L, R0 + gate[g] * d * d, R[g]);
  load_rows(L, c0 + bh * d, c);
  for (int e = threadIdx.x; e < d; e += blockDim.x) hbuf[e] = h0[bh * d + e];
  __syncthreads();
  for (int t = 0; t < T; ++t) {
    acc_t s[KPL], a[3][RPW], hh[RPW];
    load_cols(L, hbuf + (t % 2) * d, s);
    softmax_cols(L, s);  // softmax(h_{t-1})
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      const int64_t o = (gate[g] * T + t) * d;
      acc_t kk[KPL], vv[RPW], zz[RPW], v_bar[RPW];
      load_cols(L, k + o, kk);
      load_rows(L, v + o, vv);
      load_rows(L, z + o, zz);
      delta_write(R[g], kk, vv, static_cast<acc_t>(beta[gate[g] * T + t]), v_bar);
      mat_vec(R[g], s, a[g]);
#pragma unroll
      for (int i = 0; i < RPW; ++i) a[g][i] += zz[i];
      store_rows(L, v_bar_out == nullptr ? nullptr : v_bar_out + o, v_bar);
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const acc_t ig = sigmoid(a[0][i]);
      c[i] = ig * a[1][i] + (1 - ig) * c[i];
      hh[i] = sigmoid(a[2][i]) * c[i];
    }
    const int64_t o = seq + (int64_t)t * d;
    store_rows(L, hbuf + ((t + 1) % 2) * d, hh);
    store_rows(L, h_out + o, hh);
    store_rows(L, c_out + o, c);
    __syncthreads();
  }
#pragma unroll
  for (int g = 0; g < 3; ++g) store_tile(L, R_out + gate[g] * d * d, R[g]);
}

// dh: dL/dh_t for every t (the final state's gradient added at t = T - 1); dcT: dL/dc_T. Shared 2 (4 NW d + 3 NW).
template <typename scalar_t, int RPW, int KPL>
__global__ void __launch_bounds__(1024)
    delta_lstm_backward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const scalar_t* __restrict__ beta,
                               const acc_type<scalar_t>* __restrict__ v_bar_in,
                               const acc_type<scalar_t>* __restrict__ h_out, const acc_type<scalar_t>* __restrict__ c_out,
                               const acc_type<scalar_t>* __restrict__ h0, const acc_type<scalar_t>* __restrict__ c0,
                               const acc_type<scalar_t>* __restrict__ RT, const acc_type<scalar_t>* __restrict__ dh,
                               const acc_type<scalar_t>* __restrict__ dcT, const acc_type<scalar_t>* __restrict__ dRT,
                               acc_type<scalar_t>* __restrict__ dz, acc_type<scalar_t>* __restrict__ dk,
                               acc_type<scalar_t>* __restrict__ dv, acc_type<scalar_t>* __restrict__ dbeta,
                               acc_type<scalar_t>* __restrict__ dR0, acc_type<scalar_t>* __restrict__ dc0,
                               acc_type<scalar_t>* __restrict__ dh0, int H, int T, int d) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  const Layout<RPW, KPL> L(d);
  const int per = 4 * L.nw * d + 3 * L.nw;  // one set of partials: sum_g R^g^T da^g, dk^g, dbeta^g
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, seq = bh * T * d;
  int64_t gate[3];
#pragma unroll
  for (int g = 0; g < 3; ++g) gate[g] = b * 3 * H + g * H + h;
  acc_t R[3][RPW][KPL], dR[3][RPW][KPL], gc[RPW], carry[RPW] = {};  // gc: dL/dc_t; carry: dL/dh_t via step t + 1
#pragma unroll
  for (int g = 0; g < 3; ++g) {
    load_tile(L, RT + gate[g] * d * d, R[g]);
    load_tile(L, dRT + gate[g] * d * d, dR[g]);
  }
  load_rows(L, dcT + bh * d, gc);
  for (int t = T - 1; t >= 0; --t) {
    acc_t* part_s = reinterpret_cast<acc_t*>(smem_raw) + (t % 2) * per;
    acc_t* part_k = part_s + L.nw * d;      // (3, NW, d)
    acc_t* part_b = part_k + 3 * L.nw * d;  // (3, NW)
    const int64_t o = seq + (int64_t)t * d;
    acc_t s[KPL], a[3][RPW], da[3][RPW], gh[RPW], c_t[RPW], c_prev[RPW], col_s[KPL] = {};
    load_cols(L, t > 0 ? h_out + o - d : h0 + bh * d, s);
    softmax_cols(L, s);
    load_rows(L, dh + o, gh);
    load_rows(L, c_out + o, c_t);
    load_rows(L, t > 0 ? c_out + o - d : c0 + bh * d, c_prev);
#pragma unroll
    for (int g = 0; g < 3; ++g) {  // the gates' pre-activations again, from R_t
      acc_t zz[RPW];
      load_rows(L, z + (gate[g] * T + t) * d, zz);
      mat_vec(R[g], s, a[g]);
#pragma unroll
      for (int i = 0; i < RPW; ++i) a[g][i] += zz[i];
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      gh[i] += carry[i];
      const acc_t ig = sigmoid(a[0][i]), og = sigmoid(a[2][i]);
      gc[i] += gh[i] * og;  // h_t = o c_t
      da[0][i] = gc[i] * (a[1][i] - c_prev[i]) * ig * (1 - ig);  // c_t = i u + (1 - i) c_{t-1}
      da[1][i] = gc[i] * ig;
      da[2][i] = gh[i] * c_t[i] * og * (1 - og);
      gc[i] *= 1 - ig;  // dL/dc_{t-1}
    }
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      const int64_t o_g = (gate[g] * T + t) * d;
      acc_t kk[KPL], vv[RPW], v_bar[RPW], dvv[RPW], col_k[KPL] = {}, db = 0;
      store_rows(L, dz + o_g, da[g]);
      add_mat_t_vec(R[g], da[g], col_s);  // dL/ds = sum_g R^g_t^T da^g
      add_outer(dR[g], da[g], s);
      load_cols(L, k + o_g, kk);
      load_rows(L, v + o_g, vv);
      load_rows(L, v_bar_in + o_g, v_bar);
      delta_write_backward(R[g], dR[g], kk, vv, v_bar, static_cast<acc_t>(beta[gate[g] * T + t]), dvv, col_k, db);
      store_rows(L, dv + o_g, dvv);
      store_partial(L, part_k + g * L.nw * d, col_k);
      if (L.lane == 0) part_b[g * L.nw + L.warp] = db;
    }
    store_partial(L, part_s, col_s);
    __syncthreads();
    acc_t ds[KPL], g_h[KPL];
    sum_partials(L, part_s, ds);
    softmax_backward(s, ds, g_h);  // dL/dh_{t-1} through s_t
    cols_to_rows(L, g_h, carry);
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      acc_t dkk[KPL];
      sum_partials(L, part_k + g * L.nw * d, dkk);
      const acc_t dbt = sum_warps(L, part_b + g * L.nw);
      store_cols(L, dk + (gate[g] * T + t) * d, dkk);
      if (threadIdx.x == 0) dbeta[gate[g] * T + t] = dbt;
    }
  }
#pragma unroll
  for (int g = 0; g < 3; ++g) store_tile(L, dR0 + gate[g] * d * d, dR[g]);
  store_rows(L, dc0 + bh * d, gc);
  store_rows(L, dh0 + bh * d, carry);
}

// ---- Recurrent Delta Net. Per (b, h): q, k, v (T, d), b (T) from x; slow R_q, R_k, R_v (3, H, d, d) and r_b (H, d);
// W (d, d), y (d). Saves (when asked) q, k, v, beta after the recurrent terms and squashing (with l2: q and k before
// the map, which the backward recomputes), and v̄. beta = beta_scale sigmoid(.); l2: q', k' by the l2 map (q' times
// d^-1/2) instead of the softmax. Shared 4 d.
template <typename scalar_t, int RPW, int KPL>
__global__ void __launch_bounds__(1024)
    rdn_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                       const scalar_t* __restrict__ b, const acc_type<scalar_t>* __restrict__ Rs,
                       const acc_type<scalar_t>* __restrict__ r_b, const acc_type<scalar_t>* __restrict__ W0,
                       const acc_type<scalar_t>* __restrict__ y0, acc_type<scalar_t>* __restrict__ y_out,
                       acc_type<scalar_t>* __restrict__ W_out, acc_type<scalar_t>* __restrict__ q_sv,
                       acc_type<scalar_t>* __restrict__ k_sv, acc_type<scalar_t>* __restrict__ v_sv,
                       acc_type<scalar_t>* __restrict__ beta_sv, acc_type<scalar_t>* __restrict__ v_bar_sv, int H,
                       int T, int d, acc_type<scalar_t> beta_scale, bool l2) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* ybuf = reinterpret_cast<acc_t*>(smem_raw);  // y_{t-1}, y_t (alternating)
  acc_t* pre = ybuf + 2 * d;                         // q and k before the softmax, rows -> columns
  const Layout<RPW, KPL> L(d);
  const int64_t bh = blockIdx.x, h = bh % H, seq = bh * T * d;
  const bool save = q_sv != nullptr;
  acc_t W[RPW][KPL], Rq[RPW][KPL], Rk[RPW][KPL], Rv[RPW][KPL], rb[KPL];
  load_tile(L, W0 + bh * d * d, W);
  load_tile(L, Rs + (0 * H + h) * d * d, Rq);
  load_tile(L, Rs + (1 * H + h) * d * d, Rk);
  load_tile(L, Rs + (2 * H + h) * d * d, Rv);
  load_cols(L, r_b + h * d, rb);
  for (int e = threadIdx.x; e < d; e += blockDim.x) ybuf[e] = y0[bh * d + e];
  __syncthreads();
  for (int t = 0; t < T; ++t) {
    const int64_t o = seq + (int64_t)t * d;
    acc_t s[KPL], qp[RPW], kp[RPW], vh[RPW], x[RPW], qh[KPL], kh[KPL], v_bar[RPW], y[RPW], sb = 0;
    load_cols(L, ybuf + (t % 2) * d, s);
#pragma unroll
    for (int j = 0; j < KPL; ++j) {
      s[j] = tanh(s[j]);  // zero beyond d
      sb += rb[j] * s[j];
    }
    const acc_t bt = beta_scale * sigmoid(static_cast<acc_t>(b[bh * T + t]) + warp_sum(sb));
    mat_vec(Rq, s, qp);
    mat_vec(Rk, s, kp);
    mat_vec(Rv, s, vh);
    load_rows(L, q + o, x);
#pragma unroll
    for (int i = 0; i < RPW; ++i) qp[i] += x[i];
    load_rows(L, k + o, x);
#pragma unroll
    for (int i = 0; i < RPW; ++i) kp[i] += x[i];
    load_rows(L, v + o, x);
#pragma unroll
    for (int i = 0; i < RPW; ++i) vh[i] += x[i];
    store_rows(L, pre, qp);
    store_rows(L, pre + d, kp);
    __syncthreads();
    load_cols(L, pre, qh);
    load_cols(L, pre + d, kh);
    if (save && l2) {
      store_cols(L, q_sv + o, qh);
      store_cols(L, k_sv + o, kh);
    }
    if (l2) {
      l2_cols(L, qh, acc_t(1) / sqrt(acc_t(d)));
      l2_cols(L, kh, acc_t(1));
    } else {
      softmax_cols(L, qh);
      softmax_cols(L, kh);
    }
    delta_write(W, kh, vh, bt, v_bar);
    mat_vec(W, qh, y);
    store_rows(L, ybuf + ((t + 1) % 2) * d, y);
    store_rows(L, y_out + o, y);
    if (save && !l2) {
      store_cols(L, q_sv + o, qh);
      store_cols(L, k_sv + o, kh);
    }
    if (save) {
      store_rows(L, v_sv + o, vh);
      store_rows(L, v_bar_sv + o, v_bar);
      if (threadIdx.x == 0) beta_sv[bh * T + t] = bt;
    }
    __syncthreads();
  }
  store_tile(L, W_out + bh * d * d, W);
}

// dy: dL/dy_t for every t (the final state's gradient added at t = T - 1). Returns the gradients of q, k, v, b (the
// inputs, before the recurrent terms and squashing), W0 and y0. Shared 3 NW d + NW.
template <typename scalar_t, int RPW, int KPL>
__global__ void __launch_bounds__(1024)
    rdn_backward_kernel(const acc_type<scalar_t>* __restrict__ Rs, const acc_type<scalar_t>* __restrict__ r_b,
                        const acc_type<scalar_t>* __restrict__ q_sv, const acc_type<scalar_t>* __restrict__ k_sv,
                        const acc_type<scalar_t>* __restrict__ v_sv, const acc_type<scalar_t>* __restrict__ beta_sv,
                        const acc_type<scalar_t>* __restrict__ v_bar_sv, const acc_type<scalar_t>* __restrict__ y_out,
                        const acc_type<scalar_t>* __restrict__ y0, const acc_type<scalar_t>* __restrict__ WT,
                        const acc_type<scalar_t>* __restrict__ dy, const acc_type<scalar_t>* __restrict__ dWT,
                        acc_type<scalar_t>* __restrict__ dq, acc_type<scalar_t>* __restrict__ dk,
                        acc_type<scalar_t>* __restrict__ dv, acc_type<scalar_t>* __restrict__ db,
                        acc_type<scalar_t>* __restrict__ dW0, acc_type<scalar_t>* __restrict__ dy0, int H, int T,
                        int d, acc_type<scalar_t> beta_scale, bool l2) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  const Layout<RPW, KPL> L(d);
  acc_t* part_q = reinterpret_cast<acc_t*>(smem_raw);  // (NW, d) each
  acc_t* part_k = part_q + L.nw * d;
  acc_t* part_s = part_k + L.nw * d;
  acc_t* part_b = part_s + L.nw * d;  // (NW,)
  const int64_t bh = blockIdx.x, h = bh % H, seq = bh * T * d;
  acc_t W[RPW][KPL], dW[RPW][KPL], Rq[RPW][KPL], Rk[RPW][KPL], Rv[RPW][KPL], rb[KPL], carry[RPW] = {};
  load_tile(L, WT + bh * d * d, W);
  load_tile(L, dWT + bh * d * d, dW);
  load_tile(L, Rs + (0 * H + h) * d * d, Rq);
  load_tile(L, Rs + (1 * H + h) * d * d, Rk);
  load_tile(L, Rs + (2 * H + h) * d * d, Rv);
  load_cols(L, r_b + h * d, rb);
  for (int t = T - 1; t >= 0; --t) {
    const int64_t o = seq + (int64_t)t * d;
    const acc_t bt = beta_sv[bh * T + t];
    acc_t qh[KPL], kh[KPL], vh[RPW], v_bar[RPW], gy[RPW], dvh[RPW], col_q[KPL] = {}, col_k[KPL] = {}, dbt = 0;
    load_cols(L, q_sv + o, qh);
    load_cols(L, k_sv + o, kh);
    acc_t q_pre[KPL], k_pre[KPL];  // with l2: the saved pre-activations, q' and k' recomputed from them
#pragma unroll
    for (int j = 0; j < KPL; ++j) q_pre[j] = qh[j], k_pre[j] = kh[j];
    if (l2) {
      l2_cols(L, qh, acc_t(1) / sqrt(acc_t(d)));
      l2_cols(L, kh, acc_t(1));
    }
    load_rows(L, v_sv + o, vh);
    load_rows(L, v_bar_sv + o, v_bar);
    load_rows(L, dy + o, gy);
#pragma unroll
    for (int i = 0; i < RPW; ++i) gy[i] += carry[i];
    add_mat_t_vec(W, gy, col_q);  // y_t = W_t q: dL/dq = W_t^T gy
    add_outer(dW, gy, qh);
    delta_write_backward(W, dW, kh, vh, v_bar, bt, dvh, col_k, dbt);
    store_rows(L, dv + o, dvh);
    store_partial(L, part_q, col_q);
    store_partial(L, part_k, col_k);
    if (L.lane == 0) part_b[L.warp] = dbt;
    __syncthreads();
    acc_t dqh[KPL], dkh[KPL], dqp[KPL], dkp[KPL], dqr[RPW], dkr[RPW], col_s[KPL] = {};
    sum_partials(L, part_q, dqh);
    sum_partials(L, part_k, dkh);
    if (l2) {
      l2_backward(L, q_pre, dqh, dqp, acc_t(1) / sqrt(acc_t(d)));
      l2_backward(L, k_pre, dkh, dkp, acc_t(1));
    } else {
      softmax_backward(qh, dqh, dqp);
      softmax_backward(kh, dkh, dkp);
    }
    const acc_t dbp = sum_warps(L, part_b) * bt * (1 - bt / beta_scale);  // beta = beta_scale sigmoid(.)
    store_cols(L, dq + o, dqp);
    store_cols(L, dk + o, dkp);
    if (threadIdx.x == 0) db[bh * T + t] = dbp;
    cols_to_rows(L, dqp, dqr);
    cols_to_rows(L, dkp, dkr);
    add_mat_t_vec(Rq, dqr, col_s);  // dL/ds = R_q^T dq + R_k^T dk + R_v^T dv + r_b db
    add_mat_t_vec(Rk, dkr, col_s);
    add_mat_t_vec(Rv, dvh, col_s);
    store_partial(L, part_s, col_s);
    __syncthreads();
    acc_t ds[KPL], yp[KPL];
    sum_partials(L, part_s, ds);
    load_cols(L, t > 0 ? y_out + o - d : y0 + bh * d, yp);
#pragma unroll
    for (int j = 0; j < KPL; ++j) {
      const acc_t s = tanh(yp[j]);
      ds[j] = (ds[j] + rb[j] * dbp) * (1 - s * s);  // s = tanh(y_{t-1})
    }
    cols_to_rows(L, ds, carry);
  }
  store_tile(L, dW0 + bh * d * d, dW);
  store_rows(L, dy0 + bh * d, carry);
}

// ---------------------------------------------------------------------------------------------
// The chunkwise delta rule's sequential part (delta_net.py's DeltaRuleChunk; Yang et al. 2024, eq. 8-11). After the
// UT transform (in PyTorch, for all chunks at once), chunk n of C steps makes one write S <- S + K_n^T U'_n with the
// pseudo-values U'_n = U_n - W_n S, where S = W^T (d_k x d_v) is the state at the chunk's start. The backward walks
// the chunks in reverse: dU'_n = G_n + K_n dS, then dS <- dS + E_n - W_n^T dU'_n, where dS is the gradient w.r.t.
// the state at the chunk's end and G_n = P_n^T dO_n, E_n = Q_n^T dO_n come from PyTorch. The gated rule decays the
// state by the chunk's D_n = exp(sum of its g) and writes with decayed keys: S <- D_n S + K_n^T U'_n (K_n, W_n as
// delta_net.py forms them), dS <- D_n dS + E_n - W_n^T dU'_n. Both passes are the one recurrence over chunks
//     X_n = A_n + sx L_n M,    M <- D_n M + F_n + sm R_n^T X_n        (D_n = 1 without a gate)
//   forward:  M = S,  A = U, L = W, sx = -1, R = K, F = 0, sm = +1, chunks in order
//   backward: M = dS, A = G, L = K, sx = +1, R = W, F = E, sm = -1, chunks in reverse
// saving, per chunk, M as it was before the chunk (forward: the chunk-start state S_n; backward: dS_{n+1}) and X_n.
// The columns of M never mix, so block (b h, column tile) keeps kStateCols columns of M in shared memory through all
// N chunks; per chunk it stages L_n, then R_n, in one C x d_k buffer. Shared: (d_k + C) kStateCols + C d_k entries.
// A first step toward a chunk form at
// flash-linear-attention's speed (no tensor cores yet); its speed and memory against the PyTorch loop and fla are
// not measured (bash .ci/gpu_check delta_net runs it).
constexpr int kStateCols = 16;

// grid B H ceil(d_v / kStateCols) (block x = bh * tiles + tile); any block size.
template <typename scalar_t>
__global__ void chunk_state_pass_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ L,
                                        const scalar_t* __restrict__ R, const scalar_t* __restrict__ F,
                                        const scalar_t* __restrict__ D, const scalar_t* __restrict__ M0,
                                        scalar_t* __restrict__ M_saved,
                                        scalar_t* __restrict__ X, scalar_t* __restrict__ M_final, int N, int C,
                                        int d_k, int d_v, scalar_t sx, scalar_t sm, bool reverse) {
  extern __shared__ unsigned char smem_raw[];
  constexpr int JB = kStateCols;
  scalar_t* sM = reinterpret_cast<scalar_t*>(smem_raw);  // (d_k, JB): this block's columns of M
  scalar_t* sX = sM + d_k * JB;                          // (C, JB): the same columns of X_n
  scalar_t* sLR = sX + C * JB;                           // (C, d_k): L_n, then R_n
  const int tiles = (d_v + JB - 1) / JB;
  const int64_t bh = blockIdx.x / tiles;
  const int j0 = (blockIdx.x % tiles) * JB, J = d_v - j0 < JB ? d_v - j0 : JB;  // columns j0 .. j0 + J - 1
  for (int e = threadIdx.x; e < d_k * JB; e += blockDim.x)
    sM[e] = e % JB < J ? M0[(bh * d_k + e / JB) * d_v + j0 + e % JB] : scalar_t(0);
  for (int step = 0; step < N; ++step) {
    const int64_t cn = bh * N + (reverse ? N - 1 - step : step);  // the chunk, counted over (b h, n)
    for (int e = threadIdx.x; e < C * d_k; e += blockDim.x) sLR[e] = L[cn * C * d_k + e];
    __syncthreads();  // sM (from the previous chunk) and L_n are in place
    for (int e = threadIdx.x; e < d_k * JB; e += blockDim.x)
      if (e % JB < J) M_saved[(cn * d_k + e / JB) * d_v + j0 + e % JB] = sM[e];
    for (int e = threadIdx.x; e < C * JB; e += blockDim.x) {  // X_n = A_n + sx L_n M
      const int c = e / JB, j = e % JB;
      scalar_t acc = 0;
      for (int i = 0; i < d_k; ++i) acc += sLR[c * d_k + i] * sM[i * JB + j];
      const int64_t o = (cn * C + c) * d_v + j0 + j;
      sX[e] = j < J ? A[o] + sx * acc : scalar_t(0);
      if (j < J) X[o] = sX[e];
    }
    __syncthreads();  // X_n complete; L_n no longer read
    for (int e = threadIdx.x; e < C * d_k; e += blockDim.x) sLR[e] = R[cn * C * d_k + e];
    __syncthreads();
    const scalar_t decay = D != nullptr ? D[cn] : scalar_t(1);
    for (int e = threadIdx.x; e < d_k * JB; e += blockDim.x) {  // M <- D_n M + F_n + sm R_n^T X_n
      const int i = e / JB, j = e % JB;
      scalar_t acc = 0;
      for (int c = 0; c < C; ++c) acc += sLR[c * d_k + i] * sX[c * JB + j];
      const scalar_t f = F != nullptr && j < J ? F[(cn * d_k + i) * d_v + j0 + j] : scalar_t(0);
      sM[e] = decay * sM[e] + f + sm * acc;
    }
    __syncthreads();  // M updated; R_n no longer read
  }
  for (int e = threadIdx.x; e < d_k * JB; e += blockDim.x)
    if (e % JB < J) M_final[(bh * d_k + e / JB) * d_v + j0 + e % JB] = sM[e];
}

// (RPW, KPL) = (N, N): N = 1 for d <= 32, 2 for d <= 64, 4 for d <= 128; NW = ceil(d / N) warps.
template <typename F>
void dispatch_layout(int d, F&& f) {
  if (d <= 32) f(std::integral_constant<int, 1>());
  else if (d <= 64) f(std::integral_constant<int, 2>());
  else f(std::integral_constant<int, 4>());
}

int warps_for(int d) { return d <= 32 ? d : d <= 64 ? (d + 1) / 2 : (d + 3) / 4; }

// Allows a kernel more than the default 48 KB of dynamic shared memory, up to what the device offers.
void allow_smem(const void* kernel, size_t bytes) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= (size_t)optin, "FWP kernel: needs ", bytes, " bytes of shared memory, the device has ",
              optin, "; use a smaller d_head or float32");
  if (bytes > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

void check_seq(const at::Tensor& x, at::IntArrayRef shape, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.is_cuda() && x.sizes() == shape, "recurrent FWP kernel: ", name, " must be a CUDA tensor of shape ",
              shape, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "recurrent FWP kernel: ", name, " has another dtype");
}

void check_state(const at::Tensor& x, at::IntArrayRef shape, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.device() == like.device() && x.sizes() == shape, "recurrent FWP kernel: ", name,
              " must be on the inputs' device with shape ", shape, ", got ", x.sizes());
}

// the state and the saved vectors are fp32 (fp64 for fp64 inputs), contiguous
at::Tensor acc_tensor(const at::Tensor& x, const at::Tensor& like) {
  return x.to(like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

template <typename T>
T* ptr(const at::Tensor& x) { return x.defined() && x.numel() > 0 ? x.data_ptr<T>() : nullptr; }

}  // namespace

// Bytes of shared memory a recurrent backward kernel uses at head width d: its per-warp partials (vectors of d and
// scalars), two sets for the Delta RNN and LSTM (one __syncthreads per step), one for the RDN. rfwp.py asks this
// before it picks the kernel, so the layer falls back to the loop on a GPU that has less.
int64_t recurrent_backward_smem(const std::string& model, int64_t d, int64_t elem_size) {
  const int64_t nw = warps_for(d);
  if (model == "delta_rnn") return 2 * (2 * nw * d + nw) * elem_size;
  if (model == "delta_lstm") return 2 * (4 * nw * d + 3 * nw) * elem_size;
  TORCH_CHECK(model == "rdn", "recurrent_backward_smem: model must be delta_rnn, delta_lstm or rdn");
  return (3 * nw * d + nw) * elem_size;
}

// Delta RNN: z, k, v (B, H, T, d), beta (B, H, T), R0 (B, H, d, d), y0 (B, H, d) -> y (B, H, T, d), R_T, v̄ (when
// save; else empty). y, R_T and v̄ are fp32 (fp64 for fp64 inputs).
std::vector<at::Tensor> delta_rnn_forward(at::Tensor z, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor R0,
                                          at::Tensor y0, bool save) {
  const int64_t B = z.size(0), H = z.size(1), T = z.size(2), d = z.size(3);
  for (auto [x, name] : {std::pair{&z, "z"}, {&k, "k"}, {&v, "v"}}) check_seq(*x, z.sizes(), name, z);
  check_seq(beta, {B, H, T}, "beta", z);
  check_state(R0, {B, H, d, d}, "R0", z), check_state(y0, {B, H, d}, "y0", z);
  TORCH_CHECK(d >= 1 && d <= 128, "recurrent FWP kernel: d_head must be in [1, 128]");
  const c10::cuda::CUDAGuard guard(z.device());
  z = z.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous();
  R0 = acc_tensor(R0, z), y0 = acc_tensor(y0, z);
  auto y = at::empty(z.sizes(), R0.options()), R = at::empty({B, H, d, d}, R0.options());
  auto v_bar = at::empty(save ? z.sizes().vec() : std::vector<int64_t>{0}, R0.options());
  if (B * H == 0) return {y, R.copy_(R0), v_bar};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "delta_rnn_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_layout(d, [&](auto n) {
      auto kernel = delta_rnn_forward_kernel<scalar_t, decltype(n)::value, decltype(n)::value>;
      const size_t smem = 2 * d * sizeof(acc_t);
      kernel<<<B * H, 32 * warps_for(d), smem, c10::cuda::getCurrentCUDAStream()>>>(
          z.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
          R0.data_ptr<acc_t>(), y0.data_ptr<acc_t>(), y.data_ptr<acc_t>(), R.data_ptr<acc_t>(), ptr<acc_t>(v_bar), T,
          d);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, R, v_bar};
}

// dy (B, H, T, d): dL/dy_t, with dL/dy_T (the final state) added at T - 1; dR (B, H, d, d) or empty.
// -> dz, dk, dv (B, H, T, d), dbeta (B, H, T), dR0, dy0 (fp32, or fp64).
std::vector<at::Tensor> delta_rnn_backward(at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor v_bar,
                                           at::Tensor y, at::Tensor y0, at::Tensor R, at::Tensor dy, at::Tensor dR) {
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), d = k.size(3);
  const c10::cuda::CUDAGuard guard(k.device());
  k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous();
  dy = acc_tensor(dy, k), dR = dR.numel() ? acc_tensor(dR, k) : at::zeros_like(R);
  auto opts = R.options();
  auto dz = at::empty(k.sizes(), opts), dk = at::empty(k.sizes(), opts), dv = at::empty(k.sizes(), opts);
  auto dbeta = at::empty({B, H, T}, opts), dR0 = at::empty_like(R), dy0 = at::empty_like(y0);
  if (B * H == 0) return {dz, dk, dv, dbeta, dR0, dy0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "delta_rnn_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_layout(d, [&](auto n) {
      auto kernel = delta_rnn_backward_kernel<scalar_t, decltype(n)::value, decltype(n)::value>;
      const int nw = warps_for(d);
      const size_t smem = recurrent_backward_smem("delta_rnn", d, sizeof(acc_t));
      allow_smem((const void*)kernel, smem);
      kernel<<<B * H, 32 * nw, smem, c10::cuda::getCurrentCUDAStream()>>>(
          k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), v_bar.data_ptr<acc_t>(),
          y.data_ptr<acc_t>(), y0.data_ptr<acc_t>(), R.data_ptr<acc_t>(), dy.data_ptr<acc_t>(), dR.data_ptr<acc_t>(),
          dz.data_ptr<acc_t>(), dk.data_ptr<acc_t>(), dv.data_ptr<acc_t>(), dbeta.data_ptr<acc_t>(),
          dR0.data_ptr<acc_t>(), dy0.data_ptr<acc_t>(), T, d);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dz, dk, dv, dbeta, dR0, dy0};
}

// Delta LSTM: z, k, v (B, 3H, T, d), beta (B, 3H, T), gates i, u, o as heads [0, H), [H, 2H), [2H, 3H);
// R0 (B, 3H, d, d), c0, h0 (B, H, d) -> h (B, H, T, d), c (B, H, T, d), R_T, v̄ (B, 3H, T, d; when save).
std::vector<at::Tensor> delta_lstm_forward(at::Tensor z, at::Tensor k, at::Tensor v, at::Tensor beta, at::Tensor R0,
                                           at::Tensor c0, at::Tensor h0, bool save) {
  const int64_t B = z.size(0), H3 = z.size(1), T = z.size(2), d = z.size(3), H = H3 / 3;
  TORCH_CHECK(H3 % 3 == 0, "delta_lstm: the head dimension holds the 3 gates");
  for (auto [x, name] : {std::pair{&z, "z"}, {&k, "k"}, {&v, "v"}}) check_seq(*x, z.sizes(), name, z);
  check_seq(beta, {B, H3, T}, "beta", z);
  check_state(R0, {B, H3, d, d}, "R0", z), check_state(c0, {B, H, d}, "c0", z), check_state(h0, {B, H, d}, "h0", z);
  TORCH_CHECK(d >= 1 && d <= 128, "recurrent FWP kernel: d_head must be in [1, 128]");
  const c10::cuda::CUDAGuard guard(z.device());
  z = z.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous();
  R0 = acc_tensor(R0, z), c0 = acc_tensor(c0, z), h0 = acc_tensor(h0, z);
  auto h = at::empty({B, H, T, d}, R0.options()), c = at::empty({B, H, T, d}, R0.options());
  auto R = at::empty({B, H3, d, d}, R0.options());
  auto v_bar = at::empty(save ? z.sizes().vec() : std::vector<int64_t>{0}, R0.options());
  if (B * H == 0) return {h, c, R.copy_(R0), v_bar};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "delta_lstm_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_layout(d, [&](auto n) {
      auto kernel = delta_lstm_forward_kernel<scalar_t, decltype(n)::value, decltype(n)::value>;
      kernel<<<B * H, 32 * warps_for(d), 2 * d * sizeof(acc_t), c10::cuda::getCurrentCUDAStream()>>>(
          z.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
          R0.data_ptr<acc_t>(), c0.data_ptr<acc_t>(), h0.data_ptr<acc_t>(), h.data_ptr<acc_t>(), c.data_ptr<acc_t>(),
          R.data_ptr<acc_t>(), ptr<acc_t>(v_bar), H, T, d);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {h, c, R, v_bar};
}

// dh (B, H, T, d): dL/dh_t with dL/dh_T added at T - 1; dc (B, H, d): dL/dc_T or empty; dR or empty.
// -> dz, dk, dv (B, 3H, T, d), dbeta (B, 3H, T), dR0, dc0, dh0.
std::vector<at::Tensor> delta_lstm_backward(at::Tensor z, at::Tensor k, at::Tensor v, at::Tensor beta,
                                            at::Tensor v_bar, at::Tensor h, at::Tensor c, at::Tensor h0,
                                            at::Tensor c0, at::Tensor R, at::Tensor dh, at::Tensor dc, at::Tensor dR) {
  const int64_t B = z.size(0), H3 = z.size(1), T = z.size(2), d = z.size(3), H = H3 / 3;
  const c10::cuda::CUDAGuard guard(z.device());
  z = z.contiguous(), k = k.contiguous(), v = v.contiguous(), beta = beta.contiguous();
  dh = acc_tensor(dh, z), dc = dc.numel() ? acc_tensor(dc, z) : at::zeros_like(c0);
  dR = dR.numel() ? acc_tensor(dR, z) : at::zeros_like(R);
  auto opts = R.options();
  auto dz = at::empty(z.sizes(), opts), dk = at::empty(z.sizes(), opts), dv = at::empty(z.sizes(), opts);
  auto dbeta = at::empty({B, H3, T}, opts), dR0 = at::empty_like(R), dc0 = at::empty_like(c0),
       dh0 = at::empty_like(h0);
  if (B * H == 0) return {dz, dk, dv, dbeta, dR0, dc0, dh0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "delta_lstm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_layout(d, [&](auto n) {
      auto kernel = delta_lstm_backward_kernel<scalar_t, decltype(n)::value, decltype(n)::value>;
      const int nw = warps_for(d);
      const size_t smem = recurrent_backward_smem("delta_lstm", d, sizeof(acc_t));
      allow_smem((const void*)kernel, smem);
      kernel<<<B * H, 32 * nw, smem, c10::cuda::getCurrentCUDAStream()>>>(
          z.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
          v_bar.data_ptr<acc_t>(), h.data_ptr<acc_t>(), c.data_ptr<acc_t>(), h0.data_ptr<acc_t>(),
          c0.data_ptr<acc_t>(), R.data_ptr<acc_t>(), dh.data_ptr<acc_t>(), dc.data_ptr<acc_t>(),
          dR.data_ptr<acc_t>(), dz.data_ptr<acc_t>(), dk.data_ptr<acc_t>(), dv.data_ptr<acc_t>(),
          dbeta.data_ptr<acc_t>(), dR0.data_ptr<acc_t>(), dc0.data_ptr<acc_t>(), dh0.data_ptr<acc_t>(), H, T, d);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dz, dk, dv, dbeta, dR0, dc0, dh0};
}

// RDN: q, k, v (B, H, T, d), b (B, H, T) from x; Rs (3, H, d, d) = R_q, R_k, R_v; r_b (H, d); W0 (B, H, d, d),
// y0 (B, H, d) -> y (B, H, T, d), W_T and, when save, the squashed q, k (with l2: before the map), the value v, beta
// and v̄ of every step. beta_scale: beta = beta_scale sigmoid(.) (2 with neg_eigval); l2: the l2 map, not the softmax.
std::vector<at::Tensor> rdn_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor b, at::Tensor Rs,
                                    at::Tensor r_b, at::Tensor W0, at::Tensor y0, bool save, double beta_scale,
                                    bool l2) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  for (auto [x, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) check_seq(*x, q.sizes(), name, q);
  check_seq(b, {B, H, T}, "b", q);
  check_state(Rs, {3, H, d, d}, "Rs", q), check_state(r_b, {H, d}, "r_b", q);
  check_state(W0, {B, H, d, d}, "W0", q), check_state(y0, {B, H, d}, "y0", q);
  TORCH_CHECK(d >= 1 && d <= 128, "recurrent FWP kernel: d_head must be in [1, 128]");
  const c10::cuda::CUDAGuard guard(q.device());
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous(), b = b.contiguous();
  Rs = acc_tensor(Rs, q), r_b = acc_tensor(r_b, q), W0 = acc_tensor(W0, q), y0 = acc_tensor(y0, q);
  auto opts = W0.options();
  auto y = at::empty(q.sizes(), opts), W = at::empty({B, H, d, d}, opts);
  const std::vector<int64_t> sv = save ? q.sizes().vec() : std::vector<int64_t>{0},
                             sb = save ? std::vector<int64_t>{B, H, T} : std::vector<int64_t>{0};
  auto q_sv = at::empty(sv, opts), k_sv = at::empty(sv, opts), v_sv = at::empty(sv, opts),
       v_bar = at::empty(sv, opts), beta = at::empty(sb, opts);
  if (B * H == 0) return {y, W.copy_(W0), q_sv, k_sv, v_sv, beta, v_bar};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rdn_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_layout(d, [&](auto n) {
      auto kernel = rdn_forward_kernel<scalar_t, decltype(n)::value, decltype(n)::value>;
      kernel<<<B * H, 32 * warps_for(d), 4 * d * sizeof(acc_t), c10::cuda::getCurrentCUDAStream()>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
          Rs.data_ptr<acc_t>(), r_b.data_ptr<acc_t>(), W0.data_ptr<acc_t>(), y0.data_ptr<acc_t>(), y.data_ptr<acc_t>(),
          W.data_ptr<acc_t>(), ptr<acc_t>(q_sv), ptr<acc_t>(k_sv), ptr<acc_t>(v_sv), ptr<acc_t>(beta),
          ptr<acc_t>(v_bar), H, T, d, acc_t(beta_scale), l2);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, W, q_sv, k_sv, v_sv, beta, v_bar};
}

// The saved tensors of rdn_forward, dy (dL/dy_t with dL/dy_T added at T - 1), dW (or empty) -> dq, dk, dv, db (of
// the inputs q, k, v, b), dW0, dy0. The slow weights' gradients are sums over b and t, left to the caller.
std::vector<at::Tensor> rdn_backward(at::Tensor Rs, at::Tensor r_b, at::Tensor q_sv, at::Tensor k_sv,
                                     at::Tensor v_sv, at::Tensor beta, at::Tensor v_bar, at::Tensor y, at::Tensor y0,
                                     at::Tensor W, at::Tensor dy, at::Tensor dW, double beta_scale, bool l2) {
  const int64_t B = y.size(0), H = y.size(1), T = y.size(2), d = y.size(3);
  const c10::cuda::CUDAGuard guard(y.device());
  TORCH_CHECK(q_sv.sizes() == y.sizes(), "rdn_backward: the forward did not save its vectors (save=false)");
  Rs = acc_tensor(Rs, y), r_b = acc_tensor(r_b, y), dy = acc_tensor(dy, y);
  dW = dW.numel() ? acc_tensor(dW, y) : at::zeros_like(W);
  auto opts = W.options();
  auto dq = at::empty(y.sizes(), opts), dk = at::empty(y.sizes(), opts), dv = at::empty(y.sizes(), opts);
  auto db = at::empty({B, H, T}, opts), dW0 = at::empty_like(W), dy0 = at::empty_like(y0);
  if (B * H == 0) return {dq, dk, dv, db, dW0, dy0};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rdn_backward", [&] {  // the saved tensors: fp32 or fp64
    dispatch_layout(d, [&](auto n) {
      auto kernel = rdn_backward_kernel<scalar_t, decltype(n)::value, decltype(n)::value>;
      const int nw = warps_for(d);
      const size_t smem = recurrent_backward_smem("rdn", d, sizeof(scalar_t));
      allow_smem((const void*)kernel, smem);
      kernel<<<B * H, 32 * nw, smem, c10::cuda::getCurrentCUDAStream()>>>(
          Rs.data_ptr<scalar_t>(), r_b.data_ptr<scalar_t>(), q_sv.data_ptr<scalar_t>(), k_sv.data_ptr<scalar_t>(),
          v_sv.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), v_bar.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          y0.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dW.data_ptr<scalar_t>(),
          dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), db.data_ptr<scalar_t>(),
          dW0.data_ptr<scalar_t>(), dy0.data_ptr<scalar_t>(), H, T, d, scalar_t(beta_scale), l2);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, db, dW0, dy0};
}

// The chunk recurrence above on (B, H, N, C, .) tensors of one dtype (fp32 or fp64): A (.., C, d_v), L, R (.., C,
// d_k), F (B, H, N, d_k, d_v) or undefined, M0 (B, H, d_k, d_v), D (B, H, N) or empty (no decay) -> M before each
// chunk (B, H, N, d_k, d_v), X (B, H, N, C, d_v), M after the last chunk.
std::vector<at::Tensor> chunk_state_pass(at::Tensor A, at::Tensor L, at::Tensor R, at::Tensor F, at::Tensor M0,
                                         at::Tensor D, double sx, double sm, bool reverse) {
  const int64_t B = A.size(0), H = A.size(1), N = A.size(2), C = A.size(3), d_v = A.size(4), d_k = L.size(4);
  TORCH_CHECK(A.is_cuda() && (A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble),
              "chunk kernel: float32 or float64 CUDA tensors");
  for (auto* x : {&L, &R}) TORCH_CHECK(x->sizes() == at::IntArrayRef({B, H, N, C, d_k}), "chunk kernel: shapes");
  TORCH_CHECK(M0.sizes() == at::IntArrayRef({B, H, d_k, d_v}), "chunk kernel: the state must be (B, H, d_k, d_v)");
  const c10::cuda::CUDAGuard guard(A.device());
  A = A.contiguous(), L = L.to(A.scalar_type()).contiguous(), R = R.to(A.scalar_type()).contiguous();
  M0 = M0.to(A.scalar_type()).contiguous();
  const bool has_F = F.defined() && F.numel() > 0, has_D = D.defined() && D.numel() > 0;
  if (has_F) F = F.to(A.scalar_type()).contiguous();
  if (has_D) {
    TORCH_CHECK(D.sizes() == at::IntArrayRef({B, H, N}), "chunk kernel: the decay must be (B, H, N)");
    D = D.to(A.scalar_type()).contiguous();
  }
  auto M_saved = at::empty({B, H, N, d_k, d_v}, A.options()), X = at::empty_like(A), M_final = at::empty_like(M0);
  const int64_t blocks = B * H * ((d_v + kStateCols - 1) / kStateCols);
  if (blocks == 0 || N == 0) return {M_saved, X, M_final.copy_(M0)};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "chunk_state_pass", [&] {
    auto kernel = chunk_state_pass_kernel<scalar_t>;
    const size_t smem = ((d_k + C) * kStateCols + C * d_k) * sizeof(scalar_t);
    allow_smem((const void*)kernel, smem);
    kernel<<<blocks, 256, smem, c10::cuda::getCurrentCUDAStream()>>>(
        A.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), ptr<scalar_t>(has_F ? F : at::Tensor()),
        ptr<scalar_t>(has_D ? D : at::Tensor()), M0.data_ptr<scalar_t>(), M_saved.data_ptr<scalar_t>(), X.data_ptr<scalar_t>(), M_final.data_ptr<scalar_t>(),
        N, C, d_k, d_v, (scalar_t)sx, (scalar_t)sm, reverse);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {M_saved, X, M_final};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fast_weight_forward, "fast-weight update forward (sum or delta rule)");
  m.def("backward", &fast_weight_backward, "fast-weight update backward (sum or delta rule)");
  m.def("gated_delta_forward", &gated_delta_forward, "gated delta rule forward (saves the state every tile)");
  m.def("gated_delta_backward", &gated_delta_backward, "gated delta rule backward (recomputes from the saved states)");
  m.def("delta_rnn_forward", &delta_rnn_forward, "Delta RNN recurrence, forward");
  m.def("delta_rnn_backward", &delta_rnn_backward, "Delta RNN recurrence, backward");
  m.def("delta_lstm_forward", &delta_lstm_forward, "Delta LSTM recurrence, forward");
  m.def("delta_lstm_backward", &delta_lstm_backward, "Delta LSTM recurrence, backward");
  m.def("rdn_forward", &rdn_forward, "Recurrent Delta Net recurrence, forward");
  m.def("rdn_backward", &rdn_backward, "Recurrent Delta Net recurrence, backward");
  m.def("chunk_state_pass", &chunk_state_pass, "the chunkwise delta rule's pass over chunks (forward or backward)");
  m.def("recurrent_backward_smem", &recurrent_backward_smem, "shared memory of a recurrent backward kernel, bytes");
}
