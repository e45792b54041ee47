#pragma once
// Launch and error-check helpers shared by the CUDA kernels.
#include <cuda_runtime.h>

#include <sstream>
#include <string>

#include "recmeta/cuda_ops.h"

/// RECMETA_CUDA_CHECK(expr): evaluate a CUDA runtime call; throw recmeta::CudaError naming
/// the call, the file:line and the CUDA error on failure.
#define RECMETA_CUDA_CHECK(expr)                                                     \
  do {                                                                               \
    cudaError_t recmeta_err_ = (expr);                                               \
    if (recmeta_err_ != cudaSuccess) {                                               \
      std::ostringstream recmeta_os_;                                                \
      recmeta_os_ << #expr << " failed at " << __FILE__ << ":" << __LINE__ << ": "  \
                  << cudaGetErrorName(recmeta_err_) << " ("                         \
                  << cudaGetErrorString(recmeta_err_) << ")";                        \
      throw ::recmeta::CudaError(recmeta_os_.str());                                 \
    }                                                                                \
  } while (0)

/// RECMETA_LAUNCH(kernel, grid, block, smem, stream, args...): launch and check the launch
/// (configuration errors surface here; asynchronous faults at the caller's next sync).
#define RECMETA_LAUNCH(kernel, grid, block, smem, stream, ...)                         \
  do {                                                                                 \
    kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__); \
    RECMETA_CUDA_CHECK(cudaGetLastError());                                            \
  } while (0)

namespace recmeta {
namespace cuda {
namespace detail {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/// Largest grid.y / grid.z the hardware accepts.
constexpr int64_t kMaxGridYZ = 65535;
/// Largest grid.x.
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace detail
}  // namespace cuda
}  // namespace recmeta
