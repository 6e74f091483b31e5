// Stand-in for csrc/emulate/emulate.py (not built into the package): the current stream is a null handle, and
// the binding's device checks accept CPU tensors (is_cuda → is_cpu; torch's own headers are included before this one).
#pragma once
#include <cuda_runtime.h>

namespace at {
namespace cuda {
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace at
#define is_cuda is_cpu
