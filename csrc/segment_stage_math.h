// Per-token math of the segment stage, shared by the C++ (CPU) and CUDA implementations.
//
// It follows kernels/segment_stage.py::torch_stage operation by operation (same operand
// order, same dtype for every intermediate), so that both native paths take the same
// branch as PyTorch at the clip boundaries:
//   w1 = clamp(w, max=delta)           (identity when there is no delta)
//   wc = clamp(w, lo, hi)              lo = 1 - eps_low, hi = 1 + eps_high
//   a = w1 * A, b = wc * A, l = -min(a, b)
//   dl/dw = -(pa * A * dw1 + (1 - pa) * A * dwc)
// with autograd's tie conventions: min() splits a tie in half (pa = 1 if a < b, 0.5 if
// a == b, else 0), clamp() passes the gradient at its bounds (dwc = lo <= w <= hi,
// dw1 = w <= delta). Plain C++ (no torch headers) so nvcc compiles it fast.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define RG_HOST_DEVICE __host__ __device__
#else
#define RG_HOST_DEVICE
#endif

namespace rankgrpo {

// Clip parameters already rounded to the stage's dtype, as PyTorch rounds a Python float
// scalar to the tensor's dtype in clamp() and in comparisons.
template <typename T>
struct StageParams {
  T lo;          // 1 - eps_low
  T hi;          // 1 + eps_high
  T delta;       // upper cap of w in the unclipped term (used when has_delta)
  T beta;        // KL weight (used when has_kl)
  bool has_delta;
  bool has_kl;
};

// PyTorch's rounding of the Python-float parameters; delta +inf or NaN means "no delta".
template <typename T>
inline StageParams<T> make_stage_params(double eps_low, double eps_high, double delta,
                                        double beta, bool has_kl) {
  StageParams<T> p;
  p.lo = static_cast<T>(1.0 - eps_low);
  p.hi = static_cast<T>(1.0 + eps_high);
  p.has_delta = std::isfinite(delta);
  p.delta = p.has_delta ? static_cast<T>(delta) : T(0);
  p.beta = static_cast<T>(beta);
  p.has_kl = has_kl;
  return p;
}

RG_HOST_DEVICE inline float rg_exp(float x) { return expf(x); }
RG_HOST_DEVICE inline double rg_exp(double x) { return exp(x); }

// Surrogate part of the loss of one masked token and its derivative w.r.t. w.
template <typename T>
RG_HOST_DEVICE inline void surrogate_terms(T w, T adv, const StageParams<T>& p, T* loss,
                                           T* dl_dw) {
  const T w1 = (p.has_delta && w > p.delta) ? p.delta : w;
  const T wc = w < p.lo ? p.lo : (w > p.hi ? p.hi : w);
  const T a = w1 * adv;
  const T b = wc * adv;
  const T pa = a < b ? T(1) : (a == b ? T(0.5) : T(0));
  const T dw1 = (!p.has_delta || w <= p.delta) ? T(1) : T(0);
  const T dwc = (w >= p.lo && w <= p.hi) ? T(1) : T(0);
  *dl_dw = -(pa * adv * dw1 + (T(1) - pa) * adv * dwc);
  *loss = -(b < a ? b : a);
}

// k3 KL term: exp(r) - r - 1 with r = ref - logp; also returns exp(r) for the gradient
// c * beta * (1 - exp(r)).
template <typename T>
RG_HOST_DEVICE inline T kl_k3(T logp, T ref, T* exp_r) {
  const T r = ref - logp;
  const T er = rg_exp(r);
  *exp_r = er;
  return er - r - T(1);
}

}  // namespace rankgrpo
