// Parameters of the CUDA kernels: raw pointers, sizes, strides and a stream.
//
// No torch and no CUDA headers here: the binding (csrc/neighbor.cpp) fills these structs
// from tensors, and every csrc/cuda/*.cu compiles with plain nvcc. The math is in
// nbkernels/backends/reference.py; the algorithm mirrors the Triton kernels
// (nbkernels/backends/triton/kernel_fwd.py and kernel_bwd.py).
#pragma once
#include <cstdint>

struct CUstream_st;
typedef CUstream_st* cudaStream_t;  // the same typedef as CUDA's driver_types.h

namespace nbk {

enum class Dtype : int32_t { f16, bf16, f32 };

// Class tile width of the class-distribution forward (its grid axis y). The launcher in
// nbkernels/backends/cuda.py cuts the label-sorted references at multiples of it.
constexpr int kClassTile = 32;

// Inputs of both directions. q (N, D) and r (M, D) share `dtype`, any strides. Row data
// (norms, lse, upstream gradients) are contiguous fp32, labels contiguous int64.
struct Inputs {
  Dtype dtype;        // fp32 products run as 3xTF32 on tensor cores (about fp32 accuracy)
  bool sqeuclidean;   // else "dot"
  bool has_offset;    // query i skips reference i + offset
  int64_t offset;
  int64_t N, M, D;
  const void* q;
  int64_t s_qn, s_qd;
  bool q_vec;         // rows may be read in 16-byte vectors (aligned, unit feature stride)
  const void* r;
  int64_t s_rm, s_rd;
  bool r_vec;
  const float* temperature;  // device scalar, read in the kernels only
  const float* q_sqnorm;     // (N,) ||q||^2, "sqeuclidean" backward only
  const float* r_sqnorm;     // (M,) ||r||^2, "sqeuclidean" only
  cudaStream_t stream;
};

// Forward. classes == false: lse_all, lse_pos (N,), shifted as in nbkernels.backends.
// classes == true: grid axis y over class tiles; tile c reads the references
// perm[tile_ptr[c]:tile_ptr[c + 1]] (label order) and writes mass (N, C) relative to its
// own running max, plus that max and sum in tile_max, tile_sum (N, n_tiles).
struct FwdParams {
  Inputs in;
  bool classes;
  const int64_t* q_labels;  // (N,), classes == false
  const int64_t* r_labels;  // (M,), sorted when classes == true
  float* lse_all;
  float* lse_pos;
  const int64_t* perm;      // (M,)
  const int64_t* tile_ptr;  // (n_tiles + 1,)
  int64_t C, n_tiles;
  float* mass;
  float* tile_max;
  float* tile_sum;
};

// Backward. ref_major == false: blocks own queries and write dq; true: they own
// references and write dr. Either may write dt_part (n_own,) = sum_other ds * logit.
// dx is written feature slice by feature slice (grid axis y).
struct BwdParams {
  Inputs in;
  bool classes;     // upstream G (N, C) of yhat, else (g_all, g_pos) of the two lse
  bool ref_major;
  bool need_dx, need_dt;
  const int64_t* q_labels;  // (N,), classes == false
  const int64_t* r_labels;  // (M,), original order
  const float* lse_all;     // (N,)
  const float* lse_pos;     // (N,), classes == false
  const float* g_all;
  const float* g_pos;
  const float* g_cls;       // (N, C), strides s_gn, s_gc; classes == true
  int64_t s_gn, s_gc, C;
  const float* delta;       // (N,) sum_c G_ic yhat_ic; classes == true
  void* dx;                 // (n_own, D) in dtype, strides s_xn, s_xd
  int64_t s_xn, s_xd;
  float* dt_part;
};

// Launch on p.in.stream. Return nullptr, or the CUDA error text of the launch.
const char* neighbor_fwd_cuda(const FwdParams& p);
const char* neighbor_bwd_cuda(const BwdParams& p);

}  // namespace nbk
