// A small CPU emulator of the CUDA features ghost_cuda.cu uses, so that the CUDA kernels' indexing,
// tiling, barriers and reductions are tested on machines without a GPU (tests/test_cuda_emu.py).
// Only compiled when GHOST_CUDA_EMULATE is defined; never part of the installed extension.
//
// Model: each CUDA thread of a block is a fiber (ucontext) on the calling OS thread; the blocks of the
// grid run one after another. A fiber runs until it reaches a synchronisation point (__syncthreads:
// the block; __shfl_down_sync: its warp) and waits there until every thread of that group has arrived,
// so the kernels see real barrier semantics and a deterministic interleaving. `__shared__` memory is a
// `static` array (one block runs at a time); dynamic shared memory is a buffer of the launch's size,
// filled with junk. A barrier that not every thread of its group reaches (divergent __syncthreads, an
// early return before a barrier) hangs on a GPU; here it throws. What it cannot find: timing,
// occupancy, and races that only the real warp scheduler's interleavings expose.
#pragma once

#include <ucontext.h>

#include <cstring>
#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error (emulated)"; }

inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

namespace ghost {
namespace emu {

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int wait_group = -1;  // -1 runnable; 0 the block barrier; 1 + w warp w's barrier
};

struct Launch {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int running = -1;
  std::vector<unsigned char> exchange;  // 32 lanes x 16 bytes per warp
  std::vector<unsigned char> dynamic_smem;
  const std::function<void()>* body = nullptr;
  std::string error;
};
inline Launch* current = nullptr;

inline void set_thread(int t) {
  const unsigned u = static_cast<unsigned>(t);
  threadIdx = uint3{u % blockDim.x, (u / blockDim.x) % blockDim.y, u / (blockDim.x * blockDim.y)};
}

inline void fiber_entry() {
  Launch& L = *current;
  try {
    (*L.body)();
  } catch (const std::exception& e) {
    if (L.error.empty()) L.error = e.what();
  }
  L.fibers[L.running].done = true;
  swapcontext(&L.fibers[L.running].ctx, &L.scheduler);
}

// Park the running fiber at a barrier of `group` (0: block, 1 + w: warp w) until the group is complete.
inline void wait_at(int group) {
  Launch& L = *current;
  Fiber& f = L.fibers[L.running];
  f.wait_group = group;
  swapcontext(&f.ctx, &L.scheduler);
}

// One launch at a time, on the calling thread.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  Launch L;
  L.fibers.resize(threads);
  for (auto& f : L.fibers) f.stack.resize(kStackBytes);
  L.exchange.assign(static_cast<size_t>((threads + 31) / 32) * 32 * 16, 0);
  L.dynamic_smem.assign(smem_bytes + 16, 0xA5);  // junk, as uninitialised shared memory holds
  L.body = &body;
  current = &L;
  blockDim = block;
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z && L.error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && L.error.empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && L.error.empty(); ++bx) {
        blockIdx = uint3{bx, by, bz};
        for (int t = 0; t < threads; ++t) {
          Fiber& f = L.fibers[t];
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
          f.done = false;
          f.wait_group = -1;
        }
        for (;;) {
          bool ran = false;
          for (int t = 0; t < threads; ++t) {  // run every runnable fiber to its next barrier or its end
            Fiber& f = L.fibers[t];
            if (f.done || f.wait_group >= 0) continue;
            L.running = t;
            set_thread(t);
            swapcontext(&L.scheduler, &f.ctx);
            ran = true;
          }
          if (!L.error.empty()) break;
          // release every group (block, or warp) whose members all wait on it
          const int nwarps = (threads + 31) / 32;
          std::vector<int> waiting(1 + nwarps, 0);
          bool all_done = true, released = false;
          for (const Fiber& f : L.fibers) {
            if (f.done) continue;
            all_done = false;
            if (f.wait_group >= 0) ++waiting[f.wait_group];
          }
          for (int grp = 0; grp <= nwarps; ++grp) {
            const int size = grp == 0 ? threads : std::min(32, threads - 32 * (grp - 1));
            if (waiting[grp] == 0 || waiting[grp] != size) continue;
            for (Fiber& f : L.fibers)
              if (f.wait_group == grp) f.wait_group = -1;
            released = true;
          }
          if (all_done) break;
          if (!released && !ran) {
            L.error = "cuda_emu: a barrier that not every thread of its block/warp reaches (block " +
                      std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) + ")";
            break;
          }
        }
      }
  current = nullptr;
  if (!L.error.empty()) throw std::runtime_error(L.error);  // fibers stuck at a barrier are abandoned
}

}  // namespace emu
}  // namespace ghost

inline void __syncthreads() { ghost::emu::wait_at(0); }
// Blocks run one after another and fibers switch only at barriers: every access is already ordered
// and every read-modify-write atomic. (What a missing fence would break on a GPU stays untested.)
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}

template <typename T>
T __shfl_down_sync(unsigned /*mask: the kernels always pass the full warp*/, T v, unsigned off) {
  static_assert(sizeof(T) <= 16, "cuda_emu: shuffle of a value over 16 bytes");
  auto& L = *ghost::emu::current;
  const int t = L.running, lane = t % 32, warp = t / 32;
  unsigned char* ex = L.exchange.data() + static_cast<size_t>(warp) * 32 * 16;
  std::memcpy(ex + lane * 16, &v, sizeof(T));
  ghost::emu::wait_at(1 + warp);
  T r = v;
  const int src = lane + static_cast<int>(off);
  const int width = static_cast<int>(blockDim.x * blockDim.y * blockDim.z) - 32 * warp;
  if (src < 32 && src < width) std::memcpy(&r, ex + src * 16, sizeof(T));
  ghost::emu::wait_at(1 + warp);
  return r;
}

#define GHOST_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(ghost::emu::current->dynamic_smem.data())
