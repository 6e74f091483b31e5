// CPU stand-in for the CUDA runtime, for csrc/emulate/emulate.py only (not built into the package): the
// epilogue kernels of csrc/cuda/epilogue.cu run on one OS thread, each CUDA thread of a block a ucontext
// coroutine. __syncthreads yields to the scheduler, which runs every coroutine of the block up to its next
// barrier (or its end), round after round, so barrier semantics hold (a read racing a write across a barrier
// shows up as a wrong result).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
struct cudaFuncAttributes {
  int unused;
};
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes*, F) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct EmuIdx {
  unsigned x, y, z;
};
extern EmuIdx threadIdx, blockIdx, gridDim, blockDim;

struct EmuScheduler {
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
  ucontext_t main;
  unsigned cur = 0;
  std::function<void()> body;
  float lanes[1024];  // __shfl_xor_sync's exchange
};
extern EmuScheduler emu;

inline void __syncthreads() { swapcontext(&emu.ctx[emu.cur], &emu.main); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu.lanes[threadIdx.x] = v;
  __syncthreads();
  const float r = emu.lanes[threadIdx.x ^ lane_mask];
  __syncthreads();
  return r;
}
inline void emu_entry() {
  emu.body();
  emu.done[emu.cur] = 1;
}
// kernel<<<grid, block, 0, stream>>>(args...) becomes emu_launch(kernel, grid, block, args...).
template <class K, class... A>
void emu_launch(K kernel, dim3 grid, dim3 block, A... args) {
  gridDim = {grid.x, grid.y, grid.z};
  blockDim = {block.x, block.y, block.z};
  const unsigned n = block.x;
  emu.ctx.resize(n);
  emu.stacks.resize(n);
  emu.done.assign(n, 0);
  emu.body = [=] { kernel(args...); };
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = {bx, by, 0};
      std::fill(emu.done.begin(), emu.done.end(), 0);
      for (unsigned t = 0; t < n; ++t) {
        emu.stacks[t].resize(1 << 16);
        getcontext(&emu.ctx[t]);
        emu.ctx[t].uc_stack.ss_sp = emu.stacks[t].data();
        emu.ctx[t].uc_stack.ss_size = emu.stacks[t].size();
        emu.ctx[t].uc_link = &emu.main;
        makecontext(&emu.ctx[t], emu_entry, 0);
      }
      for (bool left = true; left;) {
        left = false;
        for (unsigned t = 0; t < n; ++t) {
          if (emu.done[t]) continue;
          emu.cur = t;
          threadIdx = {t, 0, 0};
          swapcontext(&emu.main, &emu.ctx[t]);
          left |= !emu.done[t];
        }
      }
    }
}

using std::isinf;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
