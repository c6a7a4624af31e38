// Building blocks of the forward and backward kernels: precision policies that feed
// mma.sync, staged tile loads, and the logit tile product.
//
// Tiling. A block of kWarps warps owns kBM = 16 kWarps rows ("own"; warp w owns rows
// 16w..16w+15, one m16 mma tile) and streams the other side kBN = 64 rows at a time. The
// feature dim goes through shared memory P::kChunk elements (256 bytes) at a time.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 and mma.m16n8k8), lane = 4 g + t:
//   C (fp32, m16n8): c[0..3] at rows (g, g, g+8, g+8), cols (2t, 2t+1, 2t, 2t+1)
//   A (m16 x k):     register r at row g + 8 (r & 1), k = kPerReg t + kStep/2 (r >> 1)
//   B (k x n8):      register r at col g,             k = kPerReg t + kStep/2 r
// with kPerReg consecutive k per register (2 for fp16/bf16, 1 for tf32).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "neighbor_cuda.h"
#ifndef NBK_PTX_HEADER
#define NBK_PTX_HEADER "ptx.cuh"  // tests/cuda/emulator.h substitutes host versions
#endif
#include NBK_PTX_HEADER

namespace nbk {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBM = 16 * kWarps;  // own rows per block
constexpr int kBN = 64;           // other rows per streamed tile
constexpr int kNT = kBN / 8;      // n8 mma tiles in a warp's [16, kBN] logit tile
constexpr float kLog2e = 1.4426950408889634f;

// exp(x) for softmax weights: one FMUL and one SFU op
__device__ __forceinline__ float fast_exp(float x) { return ex2(x * kLog2e); }

// Reductions over the 4 lanes (a quad) that share a row of a C fragment.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------- precision policies
//
// A policy stores the input dtype as raw bits T and feeds mma.sync with kParts parts of
// every operand: 1 for fp16 / bf16, 2 for fp32 (3xTF32).

// fp16 (kBf16 = false) or bf16: m16n8k16, fp32 accumulation.
template <bool kBf16>
struct Half16 {
  using T = uint16_t;
  static constexpr int kStep = 16, kPerReg = 2, kParts = 1, kChunk = 128;
  static constexpr int kLd = kChunk + 8;  // smem row: 272 bytes, 16-byte aligned, no conflicts

  __device__ static float to_float(T x) {
    if constexpr (kBf16) return __bfloat162float(__ushort_as_bfloat16(x));
    else return __half2float(__ushort_as_half(x));
  }
  __device__ static T from_float(float x) {
    if constexpr (kBf16) return __bfloat16_as_ushort(__float2bfloat16_rn(x));
    else return __half_as_ushort(__float2half_rn(x));
  }
  // register r of fragment f from elements (k, k + 1) at p (lower k in the low half)
  template <int R>
  __device__ static void load_reg(const T* p, uint32_t (&f)[kParts][R], int r) {
    f[0][r] = *reinterpret_cast<const uint32_t*>(p);
  }
  // B fragment of an operand stored [k][n] (k = other rows): k = 2t + 8r (+1), n = g
  __device__ static void frag_bt(const T* base, int ld, int lane, uint32_t (&b)[kParts][2]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const T* p = base + (2 * t + 8 * r) * ld + g;
      b[0][r] = uint32_t(p[0]) | (uint32_t(p[ld]) << 16);
    }
  }
  // A fragment of k16 step kk from C fragments: n8 tiles 2kk (k 0..7) and 2kk + 1 (k 8..15)
  __device__ static void frag_a_acc(const float (&c)[kNT][4], int kk, uint32_t (&a)[kParts][4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float* v = c[2 * kk + (r >> 1)] + 2 * (r & 1);
      a[0][r] = uint32_t(from_float(v[0])) | (uint32_t(from_float(v[1])) << 16);
    }
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (kBf16) mma_bf16(d, a, b);
    else mma_f16(d, a, b);
  }
};

// fp32 inputs on TF32 tensor cores, m16n8k8, as 3xTF32: x = hi + lo with both parts in
// TF32, and a b = hi*hi + hi*lo + lo*hi (about fp32 accuracy; lo*lo is below fp32 rounding).
struct TF32 {
  using T = float;
  static constexpr int kStep = 8, kPerReg = 1, kParts = 2, kChunk = 64;
  static constexpr int kLd = kChunk + 4;  // 272 bytes, as Half16

  __device__ static float to_float(T x) { return x; }
  __device__ static T from_float(float x) { return x; }
  template <int R>
  __device__ static void put(float x, uint32_t (&f)[kParts][R], int r) {
    const uint32_t hi = to_tf32(x);
    f[0][r] = hi;
    f[1][r] = to_tf32(x - __uint_as_float(hi));
  }
  template <int R>
  __device__ static void load_reg(const T* p, uint32_t (&f)[kParts][R], int r) {
    put(*p, f, r);
  }
  // B fragment of an operand stored [k][n]. The k order is permuted to match frag_a_acc:
  // register r holds other row 2t + r (k = t + 4r), n = g.
  __device__ static void frag_bt(const T* base, int ld, int lane, uint32_t (&b)[kParts][2]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) put(base[(2 * t + r) * ld + g], b, r);
  }
  // A fragment of k8 step kk from C fragment kk: the k slot t holds col 2t, slot t + 4
  // col 2t + 1, so that every lane keeps its own values (no shuffles)
  __device__ static void frag_a_acc(const float (&c)[kNT][4], int kk, uint32_t (&a)[kParts][4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) put(c[kk][2 * (r & 1) + (r >> 1)], a, r);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_tf32(d, a, b);
  }
};

// d += a b over the parts: hi*hi, then hi*lo, then lo*hi for 3xTF32. ``swapped``: a holds
// the other side's rows (the dr kernel's references against queries), so the two
// corrections go in the other order, as when a is the queries: every kernel then rounds a
// logit's sum of the same products in the same order, and the backward's logits are the
// forward's to the last bit (a different order moved them by 2/T ulps: exp(2/T ulp) off)
template <class P>
__device__ __forceinline__ void mma_parts(float (&d)[4], const uint32_t (&a)[P::kParts][4],
                                          const uint32_t (&b)[P::kParts][2],
                                          bool swapped = false) {
  if (swapped) {
#pragma unroll
    for (int j = 0; j < P::kParts; ++j)
#pragma unroll
      for (int i = 0; i + j < P::kParts; ++i) P::mma(d, a[i], b[j]);
  } else {
#pragma unroll
    for (int i = 0; i < P::kParts; ++i)
#pragma unroll
      for (int j = 0; j + i < P::kParts; ++j) P::mma(d, a[i], b[j]);
  }
}

// A fragment of a [16, kStep] tile stored row-major at base (leading dim ld)
template <class P>
__device__ __forceinline__ void frag_a(const typename P::T* base, int ld, int lane,
                                       uint32_t (&a)[P::kParts][4]) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 4; ++r)
    P::load_reg(base + (g + 8 * (r & 1)) * ld + P::kPerReg * t + P::kStep / 2 * (r >> 1), a, r);
}

// B fragment of a [kStep, 8] operand stored transposed, [8][kStep] row-major at base
template <class P>
__device__ __forceinline__ void frag_b(const typename P::T* base, int ld, int lane,
                                       uint32_t (&b)[P::kParts][2]) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) P::load_reg(base + g * ld + P::kPerReg * t + P::kStep / 2 * r, b, r);
}

// ------------------------------------------------------------------------ tile loads

// A strided (rows, D) matrix in global memory.
struct Mat {
  const void* p;
  int64_t s_row, s_col;
  bool vec;
};

// sm[ROWS][P::kLd] = rows idx[0..ROWS) (shared; -1: absent), features [k0, k0 + kChunk)
// of x, zeros past D. 16-byte vectors where x allows it, else element by element.
template <class P, int ROWS>
__device__ __forceinline__ void load_chunk(typename P::T* sm, const Mat& x, const int64_t* idx,
                                           int64_t k0, int64_t D) {
  using T = typename P::T;
  constexpr int kVec = 16 / sizeof(T), kPerRow = P::kChunk / kVec;
  const T* src = static_cast<const T*>(x.p);
  for (int c = threadIdx.x; c < ROWS * kPerRow; c += kThreads) {
    const int row = c / kPerRow, kv = (c % kPerRow) * kVec;
    const int64_t i = idx[row], k = k0 + kv;
    T* dst = sm + row * P::kLd + kv;
    if (x.vec && i >= 0 && k + kVec <= D) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src + i * x.s_row + k);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        dst[e] = (i >= 0 && k + e < D) ? src[i * x.s_row + (k + e) * x.s_col] : T(0);
    }
  }
}

// acc[16, kBN] (this warp's rows) = x[own rows] . y[other rows]^T over all of D. xs must
// already hold the own rows when D fits one chunk (n_chunks == 1); otherwise both sides
// are staged chunk by chunk. Ends with ys holding the last chunk. Call from all threads.
// ``swapped``: x holds the references, y the queries (``mma_parts``).
template <class P>
__device__ __forceinline__ void tile_dot(float (&acc)[kNT][4], typename P::T* xs,
                                         typename P::T* ys, const Mat& x, const int64_t* x_idx,
                                         const Mat& y, const int64_t* y_idx, int64_t D,
                                         int n_chunks, bool swapped = false) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kNT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int c = 0; c < n_chunks; ++c) {
    const int64_t k0 = int64_t(c) * P::kChunk;
    if (c > 0) __syncthreads();  // the previous chunk is consumed
    if (n_chunks > 1) load_chunk<P, kBM>(xs, x, x_idx, k0, D);
    load_chunk<P, kBN>(ys, y, y_idx, k0, D);
    __syncthreads();
    const int64_t k_end = D - k0;  // zeros past it: skip whole k steps
#pragma unroll 2
    for (int kk = 0; kk < P::kChunk / P::kStep; ++kk) {
      if (kk * P::kStep < k_end) {
        uint32_t a[P::kParts][4];
        // [16, kStep] of this warp's own rows
        frag_a<P>(xs + 16 * warp * P::kLd + kk * P::kStep, P::kLd, lane, a);
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          uint32_t b[P::kParts][2];
          // [kStep, 8] of other rows 8j..8j+7
          frag_b<P>(ys + 8 * j * P::kLd + kk * P::kStep, P::kLd, lane, b);
          mma_parts<P>(acc[j], a, b, swapped);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------- dispatch

// f(policy) for the input dtype
template <class F>
void with_policy(const Inputs& in, F&& f) {
  switch (in.dtype) {
    case Dtype::f16: f(Half16<false>{}); break;
    case Dtype::bf16: f(Half16<true>{}); break;
    default: f(TF32{});
  }
}

// f(std::true_type / std::false_type): a runtime flag as a template argument
template <class F>
void with_flag(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace nbk
