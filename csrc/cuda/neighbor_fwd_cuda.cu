// Fused forward: the two online log-sum-exps (all references, positives), or the class
// mass per class tile. The math is in nbkernels/backends/reference.py; the algorithm is
// that of neighbor_fwd_kernel in nbkernels/backends/triton/kernel_fwd.py.
//
// A block owns kBM queries and streams reference tiles of kBN: logits on tensor cores
// (tile_dot), then an online softmax in registers. Each running statistic has its own
// running max. The class mass is a second tensor-core product, p . onehot(labels), always
// in 3xTF32 (p in [0, 1]: one TF32 rounding would cost 1e-3 of yhat; the one-hot is exact).
#include "tile.cuh"

namespace nbk {
namespace {

constexpr int kCT = kClassTile / 8;  // n8 mma tiles of a class tile

// One online log-sum-exp step of a row: fold the tile's max (over the quad sharing the
// row) into the running max m and rescale the running sum l by alpha. Returns the shift
// of this tile's exponentials: 0 while every term so far is -inf, so that exp sees -inf,
// not NaN. fmaxf drops NaN from the max; l still turns NaN through exp.
__device__ __forceinline__ float online_step(float& m, float& l, float tile_max, float& alpha) {
  const float m_new = fmaxf(m, quad_max(tile_max));
  const float shift = m_new == -INFINITY ? 0.f : m_new;
  alpha = fast_exp(m - shift);
  m = m_new;
  l *= alpha;
  return shift;
}

template <class P, bool kSq, bool kClass>
__global__ void __launch_bounds__(kThreads) neighbor_fwd_kernel(const FwdParams p) {
  using T = typename P::T;
  __shared__ __align__(16) T xs[kBM * P::kLd];
  __shared__ __align__(16) T ys[kBN * P::kLd];
  __shared__ int64_t x_idx[kBM], y_idx[kBN], y_lab[kBN];
  __shared__ float y_rn[kBN];
  const Inputs& in = p.in;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const float inv_t = 1.f / *in.temperature;
  // shifted logit s_ij = c_dot q_i.r_j - ||r_j||^2 / T   (c_dot = 2/T "sqeuclidean", 1/T "dot")
  const float c_dot = (kSq ? 2.f : 1.f) * inv_t;
  const Mat x{in.q, in.s_qn, in.s_qd, in.q_vec}, y{in.r, in.s_rm, in.s_rd, in.r_vec};

  if (threadIdx.x < kBM) x_idx[threadIdx.x] = row0 + threadIdx.x < in.N ? row0 + threadIdx.x : -1;
  // this lane's two rows of the C fragments: 16 warp + g (h = 0) and + 8 (h = 1)
  int64_t qi[2], qa[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    qi[h] = row0 + 16 * warp + (lane >> 2) + 8 * h;
    if (qi[h] >= in.N) qi[h] = -1;
    qa[h] = (!kClass && qi[h] >= 0) ? p.q_labels[qi[h]] : 0;
  }
  // references in [lo, hi): all of them, or (kClass) those of class tile blockIdx.y
  int64_t lo = 0, hi = in.M, c0 = 0;
  if constexpr (kClass) {
    lo = p.tile_ptr[blockIdx.y];
    hi = p.tile_ptr[blockIdx.y + 1];
    c0 = int64_t(blockIdx.y) * kClassTile;
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};    // all references
  float mp[2] = {-INFINITY, -INFINITY}, lp[2] = {0.f, 0.f};  // positives
  float mass[kCT][4] = {};  // [16, kClassTile] relative to m
  const int n_chunks = int((in.D + P::kChunk - 1) / P::kChunk);
  __syncthreads();
  if (n_chunks == 1) load_chunk<P, kBM>(xs, x, x_idx, 0, in.D);  // queries stay resident

  for (int64_t j0 = lo; j0 < hi; j0 += kBN) {
    __syncthreads();  // the previous tile is consumed
    if (threadIdx.x < kBN) {
      const int64_t pos = j0 + threadIdx.x;
      const bool ok = pos < hi;
      const int64_t j = !ok ? -1 : kClass ? p.perm[pos] : pos;
      y_idx[threadIdx.x] = j;
      y_lab[threadIdx.x] = ok ? p.r_labels[pos] : -1;
      y_rn[threadIdx.x] = (kSq && ok) ? in.r_sqnorm[j] * inv_t : 0.f;
    }
    __syncthreads();
    float s[kNT][4];
    tile_dot<P>(s, xs, ys, x, x_idx, y, y_idx, in.D, n_chunks);

    // [16, kBN] shifted logits, -inf where masked (out of range, excluded pair)
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t + (e & 1), h = e >> 1;
        const int64_t rj = y_idx[col];
        const bool ok = qi[h] >= 0 && rj >= 0 && !(in.has_offset && rj == qi[h] + in.offset);
        s[j][e] = ok ? s[j][e] * c_dot - y_rn[col] : -INFINITY;
        mx[h] = fmaxf(mx[h], s[j][e]);
      }
    float alpha[2], shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) shift[h] = online_step(m[h], l[h], mx[h], alpha[h]);

    if constexpr (kClass) {
      // p_ij = exp(s_ij - m_i), in place
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j][e] = fast_exp(s[j][e] - shift[e >> 1]);
          l[e >> 1] += s[j][e];
        }
      // mass_ic = sum_{b_j = c} p_ij, rescaled like l; mass += p[16, kBN] . onehot[kBN, kCT 8]
#pragma unroll
      for (int jc = 0; jc < kCT; ++jc)
#pragma unroll
        for (int e = 0; e < 4; ++e) mass[jc][e] *= alpha[e >> 1];
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        uint32_t a[2][4];
        TF32::frag_a_acc(s, j, a);
#pragma unroll
        for (int jc = 0; jc < kCT; ++jc) {
          // B register r: reference 8j + 2t + r (TF32's k order), class c0 + 8jc + g
          uint32_t b[2];
#pragma unroll
          for (int r = 0; r < 2; ++r)
            b[r] = y_lab[8 * j + 2 * t + r] == c0 + 8 * jc + (lane >> 2) ? 0x3f800000u : 0u;
          TF32::mma(mass[jc], a[1], b);
          TF32::mma(mass[jc], a[0], b);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) l[e >> 1] += fast_exp(s[j][e] - shift[e >> 1]);
      // positives: b_j = a_i (masked logits are already -inf)
      float mxp[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (qa[e >> 1] == y_lab[8 * j + 2 * t + (e & 1)]) mxp[e >> 1] = fmaxf(mxp[e >> 1], s[j][e]);
      float alpha_p[2], shift_p[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) shift_p[h] = online_step(mp[h], lp[h], mxp[h], alpha_p[h]);
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (qa[e >> 1] == y_lab[8 * j + 2 * t + (e & 1)])
            lp[e >> 1] += fast_exp(s[j][e] - shift_p[e >> 1]);
    }
  }

  // each lane summed its own columns: reduce over the quad
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] = quad_sum(l[h]);
    lp[h] = quad_sum(lp[h]);
  }
  if constexpr (kClass) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (qi[h] >= 0 && t == 0) {
        p.tile_max[qi[h] * p.n_tiles + blockIdx.y] = m[h];
        p.tile_sum[qi[h] * p.n_tiles + blockIdx.y] = l[h];
      }
#pragma unroll
    for (int jc = 0; jc < kCT; ++jc)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = qi[e >> 1], c = c0 + 8 * jc + 2 * t + (e & 1);
        if (i >= 0 && c < p.C) p.mass[i * p.C + c] = mass[jc][e];
      }
  } else {
    // lse = m + log l; no term: -inf + log 0 = -inf
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (qi[h] >= 0 && t == 0) {
        p.lse_all[qi[h]] = m[h] + logf(l[h]);
        p.lse_pos[qi[h]] = mp[h] + logf(lp[h]);
      }
  }
}

template <class P, bool kSq, bool kClass>
void launch(const FwdParams& p) {
  const dim3 grid(unsigned((p.in.N + kBM - 1) / kBM), kClass ? unsigned(p.n_tiles) : 1u);
  const auto kernel = neighbor_fwd_kernel<P, kSq, kClass>;
  NBK_LAUNCH(kernel, grid, kThreads, p.in.stream, p);
}

}  // namespace

const char* neighbor_fwd_cuda(const FwdParams& p) {
  if (p.in.N == 0 || (p.classes && p.n_tiles == 0)) return nullptr;
  if (p.classes && p.n_tiles > 65535) return "too many class tiles (grid axis y > 65535)";
  with_policy(p.in, [&](auto policy) {
    with_flag(p.in.sqeuclidean, [&](auto sq) {
      with_flag(p.classes, [&](auto cls) {
        launch<decltype(policy), decltype(sq)::value, decltype(cls)::value>(p);
      });
    });
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace nbk
