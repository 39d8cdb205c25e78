// CUDA implementation of rankgrpo::segment_stage (contract: torch_stage in
// kernels/segment_stage.py; per-token math shared with the CPU op in segment_stage_math.h).
//
// Four kernels on one stream, all grid-stride over the B*T tokens:
//   key_sums   per key: n_k (int32 atomics), s_k = sum of logp - old_logp (float atomics)
//   token      per token: w = exp(s_k / max(n_k, 1)), loss term, dl/dw, stats;
//              per key Q_k += c_t dl_t/dw (float atomics); per block partial sums
// The atomics are warp-aggregated: one per run of adjacent lanes with the same key.
//   grad       per token: g_t = (w_k / n_k) Q_k + c_t beta (1 - exp(ref_t - logp_t))
//   finalize   one block sums the per-block partials in a fixed order -> loss, stats
// Keys need not be contiguous or sorted. Determinism: s_k and Q_k are summed with atomics,
// so their last bits (and what follows from them: w, g, loss, ratio stats) may differ from
// run to run, as with torch_stage's index_add_ on CUDA; counts are exact, and the loss and
// stats reduction over blocks is in a fixed order. float64 atomicAdd needs sm_60+ (built
// for sm_80/sm_90). Compiled without torch headers; built with --fmad=false so products and
// sums round as in PyTorch's separate elementwise kernels.
#include <cuda_runtime.h>

#include <cstdint>

#include "segment_stage_cuda.h"
#include "segment_stage_math.h"

namespace rankgrpo {
namespace {

// Partial-sum slots: the loss, then the 7 stats in STAT_NAMES order.
constexpr int kSlots = 8;
constexpr int kMinSlot = 5;  // ratio_min
constexpr int kMaxSlot = 6;  // ratio_max

__device__ __forceinline__ double combine(int slot, double a, double b) {
  return slot == kMinSlot ? fmin(a, b) : (slot == kMaxSlot ? fmax(a, b) : a + b);
}

__device__ __forceinline__ void init_slots(double (&v)[kSlots]) {
  for (int j = 0; j < kSlots; ++j) v[j] = 0.0;
  v[kMinSlot] = __longlong_as_double(0x7ff0000000000000LL);   // +inf
  v[kMaxSlot] = __longlong_as_double(0xfff0000000000000LL);   // -inf
}

// Tree reduction over the block in a fixed order; the result is in v of thread 0.
__device__ void block_reduce(double (&v)[kSlots]) {
  __shared__ double sh[kSlots][kCudaThreads];
  const int tid = threadIdx.x;
  for (int j = 0; j < kSlots; ++j) sh[j][tid] = v[j];
  __syncthreads();
  for (int off = kCudaThreads / 2; off > 0; off >>= 1) {
    if (tid < off) {
      for (int j = 0; j < kSlots; ++j) sh[j][tid] = combine(j, sh[j][tid], sh[j][tid + off]);
    }
    __syncthreads();
  }
  if (tid == 0) {
    for (int j = 0; j < kSlots; ++j) v[j] = sh[j][0];
  }
}

template <typename T>
__device__ __forceinline__ T key_ratio(const T* s, const int32_t* cnt, int64_t k, T* n_out) {
  const int32_t n = cnt[k];
  const T nf = static_cast<T>(n > 1 ? n : 1);
  *n_out = nf;
  return rg_exp(s[k] / nf);
}

struct TokenRange {
  int64_t begin, stride;
};

__device__ __forceinline__ TokenRange token_range() {
  return {static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
          static_cast<int64_t>(gridDim.x) * blockDim.x};
}

constexpr unsigned kFullWarp = 0xffffffffu;

// buf[k] += v for the 32 lanes of a warp with one atomicAdd per run of adjacent lanes with
// the same key (segments are runs of tokens, so a warp mostly issues one or two atomics,
// not 32 on one address). k < 0: nothing to add. All lanes of the warp must call it.
template <typename V>
__device__ __forceinline__ void warp_run_add(int64_t k, V v, V* buf) {
  const int lane = threadIdx.x & 31;
  const int64_t prev = __shfl_up_sync(kFullWarp, k, 1);
  const bool head = lane == 0 || prev != k;
  const unsigned heads = __ballot_sync(kFullWarp, head);
  const unsigned later_heads = heads & ~((2u << lane) - 1u);  // heads above this lane
  const int end = later_heads ? __ffs(later_heads) - 1 : 32;  // this run ends before `end`
  for (int off = 1; off < 32; off <<= 1) {
    const V other = __shfl_down_sync(kFullWarp, v, off);
    if (lane + off < end) v += other;
  }
  if (head && k >= 0) atomicAdd(buf + k, v);
}

// Warp-uniform walks over the tokens: token i = base + threadIdx.x may be >= n_tokens.
__device__ __forceinline__ int64_t first_base() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x;
}
__device__ __forceinline__ int64_t base_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Key of token i when it counts, else -1 (masked out, past the end, or a key outside
// [0, num_keys): the CPU op raises on those, here they are skipped).
__device__ __forceinline__ int64_t token_key(int64_t i, int64_t n_tokens, const bool* mask,
                                             const int64_t* key, int64_t num_keys) {
  if (i >= n_tokens || !mask[i]) return -1;
  const int64_t k = key[i];
  return (k >= 0 && k < num_keys) ? k : -1;
}

template <typename T>
__global__ void __launch_bounds__(kCudaThreads)
    key_sums_kernel(const T* __restrict__ logp, const T* __restrict__ old_logp,
                    const int64_t* __restrict__ key, const bool* __restrict__ mask,
                    int64_t n_tokens, int64_t num_keys, T* s, int32_t* cnt) {
  for (int64_t base = first_base(); base < n_tokens; base += base_stride()) {
    const int64_t i = base + threadIdx.x;
    const int64_t k = token_key(i, n_tokens, mask, key, num_keys);
    warp_run_add<T>(k, k >= 0 ? logp[i] - old_logp[i] : T(0), s);
    warp_run_add<int32_t>(k, 1, cnt);
  }
}

template <typename T>
__global__ void __launch_bounds__(kCudaThreads)
    token_kernel(const T* __restrict__ logp, const T* __restrict__ ref_logp,
                 const T* __restrict__ adv, const int64_t* __restrict__ key,
                 const T* __restrict__ c, const bool* __restrict__ mask, int64_t n_tokens,
                 int64_t num_keys, const T* __restrict__ s, const int32_t* __restrict__ cnt,
                 T* q, double* __restrict__ partials, StageParams<T> p) {
  double v[kSlots];
  init_slots(v);
  for (int64_t base = first_base(); base < n_tokens; base += base_stride()) {
    const int64_t i = base + threadIdx.x;
    const int64_t k = token_key(i, n_tokens, mask, key, num_keys);
    T q_add = T(0);
    if (k >= 0) {
      T nf;
      const T w = key_ratio(s, cnt, k, &nf);
      const T a = adv[i];
      T term, dl_dw;
      surrogate_terms(w, a, p, &term, &dl_dw);
      if (p.has_kl) {
        T er;
        const T kl = kl_k3(logp[i], ref_logp[i], &er);
        term = term + p.beta * kl;
        v[7] += static_cast<double>(kl);
      }
      q_add = c[i] * dl_dw;
      v[0] += static_cast<double>(term * c[i]);
      v[1] += 1.0;
      v[2] += (w < p.lo && a < T(0)) ? 1.0 : 0.0;
      v[3] += (w > p.hi && a > T(0)) ? 1.0 : 0.0;
      v[4] += static_cast<double>(w);
      v[kMinSlot] = fmin(v[kMinSlot], static_cast<double>(w));
      v[kMaxSlot] = fmax(v[kMaxSlot], static_cast<double>(w));
    }
    warp_run_add<T>(k, q_add, q);  // every lane, one call site
  }
  block_reduce(v);
  if (threadIdx.x == 0) {
    for (int j = 0; j < kSlots; ++j) partials[blockIdx.x * kSlots + j] = v[j];
  }
}

template <typename T>
__global__ void __launch_bounds__(kCudaThreads)
    grad_kernel(const T* __restrict__ logp, const T* __restrict__ ref_logp,
                const int64_t* __restrict__ key, const T* __restrict__ c,
                const bool* __restrict__ mask, int64_t n_tokens, int64_t num_keys,
                const T* __restrict__ s, const int32_t* __restrict__ cnt,
                const T* __restrict__ q, T* __restrict__ g, StageParams<T> p) {
  const TokenRange r = token_range();
  for (int64_t i = r.begin; i < n_tokens; i += r.stride) {
    const int64_t k = key[i];
    if (!mask[i] || k < 0 || k >= num_keys) {
      g[i] = T(0);
      continue;
    }
    T nf;
    const T w = key_ratio(s, cnt, k, &nf);
    const T wn = w / nf;
    T gi = wn * q[k];
    if (p.has_kl) {
      T er;
      kl_k3(logp[i], ref_logp[i], &er);
      gi = gi + c[i] * p.beta * (T(1) - er);
    }
    g[i] = gi;
  }
}

template <typename T>
__global__ void __launch_bounds__(kCudaThreads)
    finalize_kernel(const double* __restrict__ partials, int64_t n_partials, T* loss,
                    T* stats) {
  double v[kSlots];
  init_slots(v);
  for (int64_t b = threadIdx.x; b < n_partials; b += kCudaThreads) {
    for (int j = 0; j < kSlots; ++j) v[j] = combine(j, v[j], partials[b * kSlots + j]);
  }
  block_reduce(v);
  if (threadIdx.x == 0) {
    loss[0] = static_cast<T>(v[0]);
    for (int j = 1; j < kSlots; ++j) stats[j - 1] = static_cast<T>(v[j]);
  }
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

template <typename T>
cudaError_t launch_typed(const CudaStageArgs& a, cudaStream_t stream) {
  const int64_t blocks = cuda_num_blocks(a.n_tokens);
  const size_t keys = static_cast<size_t>(a.num_keys);
  char* ws = static_cast<char*>(a.workspace);
  double* partials = reinterpret_cast<double*>(ws);
  char* sums = ws + align256(static_cast<size_t>(blocks) * kSlots * sizeof(double));
  T* s = reinterpret_cast<T*>(sums);
  T* q = reinterpret_cast<T*>(sums + align256(keys * sizeof(T)));
  int32_t* cnt = reinterpret_cast<int32_t*>(sums + 2 * align256(keys * sizeof(T)));
  const size_t sum_bytes = 2 * align256(keys * sizeof(T)) + align256(keys * sizeof(int32_t));
  cudaError_t err = cudaMemsetAsync(sums, 0, sum_bytes, stream);
  if (err != cudaSuccess) return err;

  const bool has_kl = a.ref_logp != nullptr;
  const StageParams<T> p =
      make_stage_params<T>(a.eps_low, a.eps_high, a.delta, a.beta, has_kl);
  const T* logp = static_cast<const T*>(a.logp);
  const T* old_logp = static_cast<const T*>(a.old_logp);
  const T* ref = static_cast<const T*>(a.ref_logp);
  const T* adv = static_cast<const T*>(a.adv);
  const T* c = static_cast<const T*>(a.c);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kCudaThreads);

  key_sums_kernel<T><<<grid, block, 0, stream>>>(logp, old_logp, a.key, a.mask, a.n_tokens,
                                                 a.num_keys, s, cnt);
  token_kernel<T><<<grid, block, 0, stream>>>(logp, ref, adv, a.key, c, a.mask, a.n_tokens,
                                              a.num_keys, s, cnt, q, partials, p);
  grad_kernel<T><<<grid, block, 0, stream>>>(logp, ref, a.key, c, a.mask, a.n_tokens,
                                             a.num_keys, s, cnt, q, static_cast<T*>(a.g), p);
  finalize_kernel<T><<<1, block, 0, stream>>>(partials, blocks, static_cast<T*>(a.loss),
                                              static_cast<T*>(a.stats));
  return cudaGetLastError();
}

}  // namespace

const char* launch_segment_stage_cuda(const CudaStageArgs& args, bool is_double, int device,
                                      int64_t stream) {
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const auto st = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream));
  err = is_double ? launch_typed<double>(args, st) : launch_typed<float>(args, st);
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace rankgrpo
