// Interface between the torch op (segment_stage.cpp) and the CUDA kernels
// (segment_stage_cuda.cu). Plain C++: the .cu includes no torch header, so it compiles in
// seconds and builds the same against a CPU-only or a CUDA torch. Tensors are allocated by
// the op (torch's caching allocator); the CUDA stream comes from Python as an integer
// (torch.cuda.current_stream().cuda_stream), since the CPU torch wheel has no c10/cuda
// headers to ask for it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rankgrpo {

constexpr int kCudaThreads = 256;
constexpr int64_t kCudaMaxBlocks = 1024;

inline int64_t cuda_num_blocks(int64_t n_tokens) {
  int64_t blocks = (n_tokens + kCudaThreads - 1) / kCudaThreads;
  if (blocks > kCudaMaxBlocks) blocks = kCudaMaxBlocks;
  return blocks < 1 ? 1 : blocks;
}

// Scratch space: per-block partial sums (8 doubles each), then per-key sums of the log
// ratio and of c * dl/dw (dtype of the stage), then per-key token counts (int32).
inline size_t cuda_workspace_bytes(int64_t n_tokens, int64_t num_keys, size_t scalar_size) {
  auto align = [](size_t x) { return (x + 255) / 256 * 256; };
  const size_t keys = static_cast<size_t>(num_keys);
  return align(static_cast<size_t>(cuda_num_blocks(n_tokens)) * 8 * sizeof(double)) +
         2 * align(keys * scalar_size) + align(keys * sizeof(int32_t));
}

struct CudaStageArgs {
  const void* logp;
  const void* old_logp;
  const void* ref_logp;  // may be null (no KL)
  const void* adv;
  const int64_t* key;
  const void* c;
  const bool* mask;
  int64_t n_tokens;
  int64_t num_keys;
  double eps_low;
  double eps_high;
  double delta;  // +inf or NaN: no delta
  double beta;
  void* g;          // [n_tokens] out
  void* loss;       // [1] out
  void* stats;      // [7] out, STAT_NAMES order
  void* workspace;  // cuda_workspace_bytes(...) bytes, any content
};

// Enqueues the whole stage on `stream` of CUDA device `device`. Returns nullptr on success,
// else a static error message. `is_double`: float64 tensors, else float32.
const char* launch_segment_stage_cuda(const CudaStageArgs& args, bool is_double, int device,
                                      int64_t stream);

}  // namespace rankgrpo
