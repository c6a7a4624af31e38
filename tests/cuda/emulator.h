// Host emulation of the CUDA that csrc/cuda uses, to run the kernels' own source on a CPU
// (tests/cuda/emulation.py builds it; never part of the extension).
//
// A block's threads are cooperative fibers (ucontext) run one block at a time, so
// __shared__ becomes a static local. __syncthreads and the warp collectives (shuffles,
// mma.sync) switch fibers until every participant has arrived. mma.sync reassembles A,
// B and C from the 32 lanes' registers with the fragment tables of the PTX ISA, written
// out here independently of the kernels' fragment loaders. What this cannot check: real
// timing, races the fiber order hides, and hardware rounding (fp32 sums run in k order).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)
#define NBK_PTX_HEADER "emulator.h"

namespace emu {

constexpr int kStack = 1 << 18;
constexpr int kBlockBarrier = 0;  // barrier ids: 0 the block, 1 + w warp w

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  int waiting = -1;  // barrier id, or -1: runnable
  bool done = false;
};
struct Barrier {
  int count = 0, arrived = 0;
};

inline ucontext_t g_scheduler;
inline std::vector<Fiber> g_fibers;
inline int g_cur = 0;
inline dim3 g_block_idx, g_grid_dim, g_block_dim;
inline std::vector<Barrier> g_barriers;
inline std::function<void()> g_body;

// Arrive at barrier id; return once every participant has arrived.
inline void wait_at(int id) {
  Barrier& b = g_barriers[id];
  if (++b.arrived == b.count) {  // the last one releases the others and goes on
    b.arrived = 0;
    for (Fiber& f : g_fibers)
      if (f.waiting == id) f.waiting = -1;
    return;
  }
  g_fibers[g_cur].waiting = id;
  swapcontext(&g_fibers[g_cur].ctx, &g_scheduler);
}

inline void fiber_entry() {
  g_body();
  g_fibers[g_cur].done = true;  // returns to g_scheduler through uc_link
}

template <class Arg>
void launch(void (*kernel)(Arg), dim3 grid, dim3 block, const Arg& arg) {
  const int n = int(block.x);
  if (n % 32 != 0) std::abort();
  g_grid_dim = grid;
  g_block_dim = block;
  g_body = [&] { kernel(arg); };
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      g_block_idx = dim3(bx, by, 0);
      g_fibers.assign(n, Fiber{});
      g_barriers.assign(1 + n / 32, Barrier{});
      g_barriers[kBlockBarrier].count = n;
      for (int w = 0; w < n / 32; ++w) g_barriers[1 + w].count = 32;
      for (int i = 0; i < n; ++i) {
        Fiber& f = g_fibers[i];
        f.tid = dim3(i, 0, 0);
        f.stack.resize(kStack);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &g_scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
      }
      for (bool left = true; left;) {
        left = false;
        bool ran = false;
        for (int i = 0; i < n; ++i) {
          if (g_fibers[i].done) continue;
          left = true;
          if (g_fibers[i].waiting >= 0) continue;
          ran = true;
          g_cur = i;
          swapcontext(&g_scheduler, &g_fibers[i].ctx);
        }
        if (left && !ran) {
          std::fprintf(stderr, "emulator: deadlock in block (%u, %u)\n", bx, by);
          std::abort();
        }
      }
    }
}

inline int lane() { return int(g_fibers[g_cur].tid.x) & 31; }
inline int warp_barrier() { return 1 + int(g_fibers[g_cur].tid.x) / 32; }

// lanes' registers for the warp collectives, per warp
struct WarpBuf {
  float f[32];
  uint32_t a[32][4], b[32][2];
  float c[32][4];
};
inline WarpBuf g_warp[32];

inline float shfl_xor(float v, int mask) {
  WarpBuf& w = g_warp[warp_barrier() - 1];
  w.f[lane()] = v;
  wait_at(warp_barrier());
  const float r = w.f[lane() ^ mask];
  wait_at(warp_barrier());
  return r;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_float(uint32_t h, bool bf16) {
  const uint16_t u = uint16_t(h);
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(u)) : __half2float(__ushort_as_half(u));
}

// D = A B + C for one warp. kind 0: m16n8k16 f16, 1: m16n8k16 bf16, 2: m16n8k8 tf32.
inline void mma(int kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  WarpBuf& w = g_warp[warp_barrier() - 1];
  const int me = lane();
  std::memcpy(w.a[me], a, sizeof a);
  std::memcpy(w.b[me], b, sizeof b);
  std::memcpy(w.c[me], d, sizeof d);
  wait_at(warp_barrier());
  const int K = kind == 2 ? 8 : 16;
  // PTX ISA "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8", groupID g, threadID_in_group t
  auto A = [&](int m, int k) -> float {
    if (kind == 2)  // tf32: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
      return bits_float(w.a[4 * (m % 8) + k % 4][(m >= 8) + 2 * (k >= 4)] & 0xffffe000u);
    // f16x2: a0,a1 (g, 2t+i), a2,a3 (g+8, 2t+i), a4,a5 (g, 2t+8+i), a6,a7 (g+8, 2t+8+i)
    const uint32_t r = w.a[4 * (m % 8) + (k % 8) / 2][(m >= 8) + 2 * (k >= 8)];
    return half_float(r >> (16 * (k % 2)), kind == 1);
  };
  auto B = [&](int k, int n) -> float {
    if (kind == 2)  // tf32: b0 (t, g), b1 (t+4, g)
      return bits_float(w.b[4 * n + k % 4][k >= 4] & 0xffffe000u);
    // f16x2: b0,b1 (2t+i, g), b2,b3 (2t+8+i, g)
    const uint32_t r = w.b[4 * n + (k % 8) / 2][k >= 8];
    return half_float(r >> (16 * (k % 2)), kind == 1);
  };
  const int g = me >> 2, t = me & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {  // c0, c1 (g, 2t+i), c2, c3 (g+8, 2t+i)
    const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
    float acc = w.c[me][i];
    for (int k = 0; k < K; ++k) acc += A(m, k) * B(k, n);
    out[i] = acc;
  }
  wait_at(warp_barrier());
  std::memcpy(d, out, sizeof out);
}

}  // namespace emu

#define threadIdx (::emu::g_fibers[::emu::g_cur].tid)
#define blockIdx (::emu::g_block_idx)
#define gridDim (::emu::g_grid_dim)
#define blockDim (::emu::g_block_dim)
#define __syncthreads() ::emu::wait_at(::emu::kBlockBarrier)
#define __shfl_xor_sync(mask, v, m) ::emu::shfl_xor((v), (m))
#define NBK_LAUNCH(kernel, grid, block, stream, arg) \
  ::emu::launch(kernel, dim3(grid), dim3(block), arg)

inline float __uint_as_float(uint32_t u) { return ::emu::bits_float(u); }
inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

// ptx.cuh, on the host
namespace nbk {
inline float ex2(float x) { return std::exp2(x); }
inline uint32_t to_tf32(float x) {  // round to nearest, ties away: add half an ulp of tf32
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;
  return u & 0xffffe000u;
}
inline void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::mma(0, d, a, b);
}
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::mma(1, d, a, b);
}
inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::mma(2, d, a, b);
}
}  // namespace nbk
