// rankgrpo::segment_stage, the O(T + segments) phase 2 of the loss as a torch op.
//
// Contract: kernels/segment_stage.py::torch_stage. Inputs are [B, T] (or [T]) contiguous
// tensors: logp, old_logp, optional ref_logp, adv, c (float32 or float64, one dtype), key
// (int64 flat segment key in [0, num_keys) on masked tokens), mask (bool). Returns
// (loss 0-dim, g = dloss/dlogp [B, T], stats [7] in STAT_NAMES order).
//
// CPU algorithm, three passes over the tokens:
//   1. per key: n_k = masked tokens, s_k = sum of logp - old_logp   (scatter into buffers)
//      w_k = exp(s_k / max(n_k, 1))
//   2. per token: loss term, dl/dw and stats; per key Q_k = sum of c_t * dl_t/dw
//   3. per token: g_t = (w_k / n_k) Q_k + c_t beta (1 - exp(ref_t - logp_t))
// Keys are summed in token order (flat index), the order index_add_ uses on CPU, so the
// ratios are bitwise those of torch_stage and ties at the clip bounds resolve the same way.
// When every row's masked keys lie in its own key range [b * K / B, (b + 1) * K / B) (the
// case for the token, sequence and rank levels built by loss.prepare) rows run in parallel
// through at::parallel_for (OpenMP); otherwise the scatter passes run serially. Loss and
// stats are summed per row in double and combined in row order: the results do not depend
// on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "segment_stage_math.h"
#ifdef RANKGRPO_WITH_CUDA
#include "segment_stage_cuda.h"
#endif

namespace rankgrpo {
namespace {

using at::Tensor;

constexpr int64_t kGrainTokens = 16384;  // tokens per parallel task, at least

// Partial sums of one row, combined in row order at the end.
struct RowStats {
  double loss = 0, ratio_sum = 0, kl_sum = 0;
  int64_t count = 0, clip_low = 0, clip_high = 0;
  double ratio_min = std::numeric_limits<double>::infinity();
  double ratio_max = -std::numeric_limits<double>::infinity();
};

void check_inputs(const Tensor& logp, const Tensor& old_logp, const c10::optional<Tensor>& ref,
                  const Tensor& adv, const Tensor& key, int64_t num_keys, const Tensor& c,
                  const Tensor& mask) {
  TORCH_CHECK(logp.dim() == 1 || logp.dim() == 2,
              "segment_stage: logp must be [B, T] or [T], got shape ", logp.sizes());
  TORCH_CHECK(logp.scalar_type() == at::kFloat || logp.scalar_type() == at::kDouble,
              "segment_stage: logp must be float32 or float64, got ", logp.scalar_type());
  TORCH_CHECK(num_keys >= 0, "segment_stage: num_keys must be >= 0, got ", num_keys);
  auto same = [&](const Tensor& x, const char* name, c10::ScalarType dtype) {
    TORCH_CHECK(x.sizes() == logp.sizes(), "segment_stage: ", name, " has shape ", x.sizes(),
                ", expected ", logp.sizes(), " (the shape of logp)");
    TORCH_CHECK(x.scalar_type() == dtype, "segment_stage: ", name, " has dtype ",
                x.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(x.device() == logp.device(), "segment_stage: ", name, " is on ", x.device(),
                ", logp on ", logp.device());
    TORCH_CHECK(x.is_contiguous(), "segment_stage: ", name, " must be contiguous");
  };
  same(logp, "logp", logp.scalar_type());
  same(old_logp, "old_logp", logp.scalar_type());
  if (ref.has_value() && ref->defined()) same(*ref, "ref_logp", logp.scalar_type());
  same(adv, "adv", logp.scalar_type());
  same(c, "c", logp.scalar_type());
  same(key, "key", at::kLong);
  same(mask, "mask", at::kBool);
}

// Runs fn(b) for every row: in parallel when rows own disjoint keys, else in row order.
template <typename F>
void for_rows(int64_t rows, int64_t cols, bool parallel, const F& fn) {
  if (!parallel) {
    for (int64_t b = 0; b < rows; ++b) fn(b);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b);
  });
}

// Per-key accumulation in token order that keeps the running sum of a run of equal keys in
// registers: the same additions in the same order as `buf[k] += v` token by token (bitwise
// the same sums), without a store per token into cache lines that other threads write too
// (the neighbouring rows' keys).
template <typename T, int N>
struct KeyRuns {
  std::array<T*, N> buf;
  std::array<T, N> acc{};
  int64_t cur = -1;

  void add(int64_t k, const std::array<T, N>& v) {
    if (k != cur) {
      flush();
      cur = k;
      for (int j = 0; j < N; ++j) acc[j] = buf[j][k];
    }
    for (int j = 0; j < N; ++j) acc[j] += v[j];
  }
  void flush() {
    if (cur >= 0) {
      for (int j = 0; j < N; ++j) buf[j][cur] = acc[j];
    }
    cur = -1;
  }
};

// Index of the first masked token whose key is outside [0, num_keys), or -1.
int64_t first_bad_key(const Tensor& key_t, const Tensor& mask_t, int64_t num_keys) {
  const int64_t* key = key_t.data_ptr<int64_t>();
  const bool* mask = mask_t.data_ptr<bool>();
  const int64_t n = key_t.numel();
  bool any_bad = false;  // branch-free first pass (vectorises), then find the index
  for (int64_t i = 0; i < n; ++i) {
    any_bad |= mask[i] & (static_cast<uint64_t>(key[i]) >= static_cast<uint64_t>(num_keys));
  }
  if (!any_bad) return -1;
  for (int64_t i = 0; i < n; ++i) {
    if (mask[i] && (key[i] < 0 || key[i] >= num_keys)) return i;
  }
  return -1;
}

// Pass 1: per-key token counts n and log-ratio sums s, each key summed in token order.
// Keys must be in range (checked before). Returns whether every row keeps to its own key
// range: then rows run in parallel (here and in pass 2), else serially in token order.
template <typename T>
bool key_sums(const T* logp, const T* old, const int64_t* key, const bool* mask, int64_t rows,
              int64_t cols, int64_t num_keys, T* n, T* s) {
  auto add_row = [&](int64_t b) {
    KeyRuns<T, 2> sums{{n, s}};
    for (int64_t i = b * cols; i < (b + 1) * cols; ++i) {
      if (mask[i]) sums.add(key[i], {T(1), logp[i] - old[i]});
    }
    sums.flush();
  };
  const bool divisible = rows > 0 && num_keys % rows == 0;
  const int64_t per_row = divisible ? num_keys / rows : 0;
  std::atomic<bool> local{divisible};
  if (divisible) {  // check each row's keys, then add the row when they are its own
    for_rows(rows, cols, true, [&](int64_t b) {
      const int64_t lo = b * per_row, hi = lo + per_row;
      bool row_local = true;
      for (int64_t i = b * cols; i < (b + 1) * cols; ++i) {
        row_local &= !mask[i] || (key[i] >= lo && key[i] < hi);
      }
      if (row_local) {
        add_row(b);
      } else {
        local = false;
      }
    });
  }
  if (!local) {  // shared keys: start over, serially in token order
    std::fill(n, n + num_keys, T(0));
    std::fill(s, s + num_keys, T(0));
    for (int64_t b = 0; b < rows; ++b) add_row(b);
  }
  return local;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> stage_cpu_typed(const Tensor& logp_t, const Tensor& old_t,
                                                   const Tensor& ref_t, const Tensor& adv_t,
                                                   const Tensor& key_t, int64_t num_keys,
                                                   const Tensor& c_t, const Tensor& mask_t,
                                                   const StageParams<T>& p) {
  const int64_t rows = logp_t.dim() == 2 ? logp_t.size(0) : 1;
  const int64_t cols = logp_t.dim() == 2 ? logp_t.size(1) : logp_t.size(0);
  const T* logp = logp_t.data_ptr<T>();
  const T* old = old_t.data_ptr<T>();
  const T* ref = p.has_kl ? ref_t.data_ptr<T>() : nullptr;
  const T* adv = adv_t.data_ptr<T>();
  const T* c = c_t.data_ptr<T>();
  const int64_t* key = key_t.data_ptr<int64_t>();
  const bool* mask = mask_t.data_ptr<bool>();

  const auto opts = logp_t.options();

  // 1. Per-key counts and log-ratio sums, then w_k (ATen's exp: bitwise torch_stage's).
  Tensor n_t = at::zeros({num_keys}, opts), s_t = at::zeros({num_keys}, opts);
  const bool parallel = key_sums(logp, old, key, mask, rows, cols, num_keys,
                                 n_t.data_ptr<T>(), s_t.data_ptr<T>());
  n_t = n_t.clamp_min(1);
  const Tensor wk_t = at::exp(s_t / n_t);
  const Tensor wn_t = wk_t / n_t;
  const T* wk = wk_t.data_ptr<T>();
  const T* wn = wn_t.data_ptr<T>();

  // 2. Per token: loss term, dl/dw, stats, and the KL part of g (kept in g until pass 3);
  //    per key Q_k = sum c_t dl_t/dw.
  Tensor q_t = at::zeros({num_keys}, opts);
  T* q = q_t.data_ptr<T>();
  Tensor g_t = at::empty_like(logp_t);
  T* g = g_t.data_ptr<T>();
  std::vector<RowStats> row_stats(static_cast<size_t>(rows));
  for_rows(rows, cols, parallel, [&](int64_t b) {
    RowStats st;
    KeyRuns<T, 1> q_sums{{q}};
    for (int64_t i = b * cols; i < (b + 1) * cols; ++i) {
      g[i] = T(0);
      if (!mask[i]) continue;
      const T w = wk[key[i]];
      T term, dl_dw;
      surrogate_terms(w, adv[i], p, &term, &dl_dw);
      if (p.has_kl) {
        T er;
        const T kl = kl_k3(logp[i], ref[i], &er);
        term = term + p.beta * kl;
        g[i] = c[i] * p.beta * (T(1) - er);
        st.kl_sum += static_cast<double>(kl);
      }
      q_sums.add(key[i], {c[i] * dl_dw});
      st.loss += static_cast<double>(term * c[i]);
      st.count += 1;
      st.clip_low += (w < p.lo && adv[i] < T(0)) ? 1 : 0;
      st.clip_high += (w > p.hi && adv[i] > T(0)) ? 1 : 0;
      st.ratio_sum += static_cast<double>(w);
      st.ratio_min = std::min(st.ratio_min, static_cast<double>(w));
      st.ratio_max = std::max(st.ratio_max, static_cast<double>(w));
    }
    q_sums.flush();
    row_stats[static_cast<size_t>(b)] = st;
  });

  // 3. g_t = (w_k / n_k) Q_k + KL part (per-token writes: always parallel).
  at::parallel_for(0, rows * cols, kGrainTokens, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (mask[i]) g[i] = wn[key[i]] * q[key[i]] + g[i];
    }
  });

  RowStats total;
  for (const RowStats& st : row_stats) {
    total.loss += st.loss;
    total.count += st.count;
    total.clip_low += st.clip_low;
    total.clip_high += st.clip_high;
    total.ratio_sum += st.ratio_sum;
    total.ratio_min = std::min(total.ratio_min, st.ratio_min);
    total.ratio_max = std::max(total.ratio_max, st.ratio_max);
    total.kl_sum += st.kl_sum;
  }
  Tensor loss = at::scalar_tensor(total.loss, opts);
  Tensor stats = at::empty({7}, opts);
  T* out = stats.data_ptr<T>();
  out[0] = static_cast<T>(total.count);
  out[1] = static_cast<T>(total.clip_low);
  out[2] = static_cast<T>(total.clip_high);
  out[3] = static_cast<T>(total.ratio_sum);
  out[4] = static_cast<T>(total.ratio_min);
  out[5] = static_cast<T>(total.ratio_max);
  out[6] = static_cast<T>(total.kl_sum);
  return {loss, g_t, stats};
}

std::tuple<Tensor, Tensor, Tensor> segment_stage_cpu(
    const Tensor& logp, const Tensor& old_logp, const c10::optional<Tensor>& ref_logp,
    const Tensor& adv, const Tensor& key, int64_t num_keys, const Tensor& c, const Tensor& mask,
    double eps_low, double eps_high, double delta, double beta, int64_t /*stream*/) {
  check_inputs(logp, old_logp, ref_logp, adv, key, num_keys, c, mask);
  const int64_t bad = first_bad_key(key, mask, num_keys);
  TORCH_CHECK(bad < 0, "segment_stage: key[", bad, "] = ", key.data_ptr<int64_t>()[bad],
              " is outside [0, num_keys=", num_keys, ") on a masked token");
  const bool has_kl = ref_logp.has_value() && ref_logp->defined() && beta != 0.0;
  const Tensor ref = has_kl ? *ref_logp : Tensor();
  if (logp.scalar_type() == at::kDouble) {
    const auto p = make_stage_params<double>(eps_low, eps_high, delta, beta, has_kl);
    return stage_cpu_typed<double>(logp, old_logp, ref, adv, key, num_keys, c, mask, p);
  }
  const auto p = make_stage_params<float>(eps_low, eps_high, delta, beta, has_kl);
  return stage_cpu_typed<float>(logp, old_logp, ref, adv, key, num_keys, c, mask, p);
}

#ifdef RANKGRPO_WITH_CUDA
std::tuple<Tensor, Tensor, Tensor> segment_stage_cuda(
    const Tensor& logp, const Tensor& old_logp, const c10::optional<Tensor>& ref_logp,
    const Tensor& adv, const Tensor& key, int64_t num_keys, const Tensor& c, const Tensor& mask,
    double eps_low, double eps_high, double delta, double beta, int64_t stream) {
  check_inputs(logp, old_logp, ref_logp, adv, key, num_keys, c, mask);
  const bool has_kl = ref_logp.has_value() && ref_logp->defined() && beta != 0.0;
  const auto opts = logp.options();
  const int64_t n_tokens = logp.numel();
  Tensor g = at::empty_like(logp);
  Tensor loss = at::empty({}, opts);
  Tensor stats = at::empty({7}, opts);
  Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda_workspace_bytes(n_tokens, num_keys, logp.element_size()))},
      opts.dtype(at::kByte));
  CudaStageArgs a;
  a.logp = logp.data_ptr();
  a.old_logp = old_logp.data_ptr();
  a.ref_logp = has_kl ? ref_logp->data_ptr() : nullptr;
  a.adv = adv.data_ptr();
  a.key = key.data_ptr<int64_t>();
  a.c = c.data_ptr();
  a.mask = mask.data_ptr<bool>();
  a.n_tokens = n_tokens;
  a.num_keys = num_keys;
  a.eps_low = eps_low;
  a.eps_high = eps_high;
  a.delta = delta;
  a.beta = has_kl ? beta : 0.0;
  a.g = g.data_ptr();
  a.loss = loss.data_ptr();
  a.stats = stats.data_ptr();
  a.workspace = workspace.data_ptr();
  const char* err = launch_segment_stage_cuda(a, logp.scalar_type() == at::kDouble,
                                              logp.get_device(), stream);
  TORCH_CHECK(err == nullptr, "segment_stage (CUDA): ", err);
  return {loss, g, stats};
}
#endif

bool cuda_compiled() {
#ifdef RANKGRPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace rankgrpo

TORCH_LIBRARY(rankgrpo, m) {
  m.def(
      "segment_stage(Tensor logp, Tensor old_logp, Tensor? ref_logp, Tensor adv, Tensor key, "
      "int num_keys, Tensor c, Tensor mask, float eps_low, float eps_high, float delta, "
      "float beta, int stream=0) -> (Tensor loss, Tensor g, Tensor stats)");
  m.def("cuda_compiled() -> bool", &rankgrpo::cuda_compiled);
}

TORCH_LIBRARY_IMPL(rankgrpo, CPU, m) {
  m.impl("segment_stage", &rankgrpo::segment_stage_cpu);
}

#ifdef RANKGRPO_WITH_CUDA
TORCH_LIBRARY_IMPL(rankgrpo, CUDA, m) {
  m.impl("segment_stage", &rankgrpo::segment_stage_cuda);
}
#endif
