// Deterministic backward: recompute the logit tiles, form ds = dloss/dlogit, and
// accumulate dq (blocks own queries) or dr (blocks own references), plus per-row partial
// sums of ds * logit for dT. The math is in nbkernels/backends/reference.py; the algorithm
// is that of neighbor_bwd_kernel in nbkernels/backends/triton/kernel_bwd.py.
//
// No atomics: every element of dx and dt_part has exactly one writer and every sum runs in
// a fixed order, so the gradients are bitwise reproducible. A block writes the feature
// slice blockIdx.y of dx (P::kChunk wide) and recomputes the logits over all of D for it.
#include "tile.cuh"

namespace nbk {
namespace {

// One query or one reference (idx -1: absent). A block loads its own rows once and
// stages the other side's rows in shared memory, tile by tile.
struct Row {
  int64_t idx, lab;
  float lse, lse_pos, g_all, g_pos, delta;  // queries only
  float norm;                               // ||x||^2 / T, "sqeuclidean" only
};

template <bool kSq, bool kClass>
__device__ __forceinline__ Row load_row(const BwdParams& p, int64_t i, bool query, float inv_t) {
  Row x{i, 0, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (i < 0) return x;
  if (query) {
    x.lse = p.lse_all[i];
    if constexpr (kClass) {
      x.delta = p.delta[i];
    } else {
      x.lab = p.q_labels[i];
      x.lse_pos = p.lse_pos[i];
      x.g_all = p.g_all[i];
      x.g_pos = p.g_pos[i];
    }
    if constexpr (kSq) x.norm = p.in.q_sqnorm[i] * inv_t;
  } else {
    x.lab = p.r_labels[i];
    if constexpr (kSq) x.norm = p.in.r_sqnorm[i] * inv_t;
  }
  return x;
}

// ds_ij and ds_ij * logit_ij (true logit, for dT) from the raw dot q_i.r_j. Every term is
// selected, never multiplied by a mask: rows without terms (lse -inf, any upstream) give 0.
template <bool kSq, bool kClass>
__device__ __forceinline__ void pair_grad(const BwdParams& p, const Row& q, const Row& r,
                                          float dot, float c_dot, float& ds, float& dsz) {
  ds = dsz = 0.f;
  if (q.idx < 0 || r.idx < 0 || (p.in.has_offset && r.idx == q.idx + p.in.offset)) return;
  const float s = dot * c_dot - r.norm;  // shifted logit, as in the forward
  // p_ij = exp(s_ij - lse_all_i): both shifted by the same row constant
  const float pa = fast_exp(s - q.lse);
  if constexpr (kClass) {
    // ds_ij = p_ij (G_{i,b_j} - delta_i); labels outside [0, C) are in no class
    const float gc = (r.lab >= 0 && r.lab < p.C) ? p.g_cls[q.idx * p.s_gn + r.lab * p.s_gc] : 0.f;
    ds = pa * (gc - q.delta);
  } else {
    // ds_ij = g_all_i p_ij + g_pos_i p+_ij,   p+_ij = [b_j = a_i] exp(s_ij - lse_pos_i)
    ds = q.g_all * pa;
    if (q.lab == r.lab) ds += q.g_pos * fast_exp(s - q.lse_pos);
  }
  // true logit: restore the row constant -||q_i||^2 / T ("sqeuclidean"; norm = 0 for "dot")
  dsz = ds != 0.f ? ds * (s - q.norm) : 0.f;
}

template <class P, bool kSq, bool kClass, bool kRm>
__global__ void __launch_bounds__(kThreads) neighbor_bwd_kernel(const BwdParams p) {
  using T = typename P::T;
  constexpr int kDT = P::kChunk / 8;  // n8 tiles of this block's dx slice
  __shared__ __align__(16) T xs[kBM * P::kLd];
  __shared__ __align__(16) T ys[kBN * P::kLd];
  __shared__ int64_t x_idx[kBM], y_idx[kBN];
  __shared__ Row y_row[kBN];
  const Inputs& in = p.in;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  const float inv_t = 1.f / *in.temperature;
  const float c_dot = (kSq ? 2.f : 1.f) * inv_t;
  // ref_major (p.ref_major, a template flag: one order of the 3xTF32 corrections compiled,
  // ``tile_dot``): own rows are references, the streamed side queries
  constexpr bool rm = kRm;
  const int64_t n_own = rm ? in.M : in.N, n_other = rm ? in.N : in.M;
  const Mat mq{in.q, in.s_qn, in.s_qd, in.q_vec}, mr{in.r, in.s_rm, in.s_rd, in.r_vec};
  const Mat x = rm ? mr : mq;  // own side
  const Mat y = rm ? mq : mr;  // streamed side
  const int64_t row0 = int64_t(blockIdx.x) * kBM;

  if (threadIdx.x < kBM) x_idx[threadIdx.x] = row0 + threadIdx.x < n_own ? row0 + threadIdx.x : -1;
  // this lane's two rows of the C fragments: 16 warp + g (h = 0) and + 8 (h = 1)
  Row own[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = row0 + 16 * warp + (lane >> 2) + 8 * h;
    own[h] = load_row<kSq, kClass>(p, i < n_own ? i : -1, !rm, inv_t);
  }
  // this block's dx slice: features [d0, d0 + kChunk)
  const int64_t d0 = int64_t(blockIdx.y) * P::kChunk;
  const int n_chunks = int((in.D + P::kChunk - 1) / P::kChunk);
  float dacc[kDT][4] = {};                    // [16, kChunk] sum_other ds y
  float rsum[2] = {0.f, 0.f}, rdt[2] = {0.f, 0.f};  // sum_other ds, sum_other ds logit
  __syncthreads();
  if (n_chunks == 1) load_chunk<P, kBM>(xs, x, x_idx, 0, in.D);  // own rows stay resident

  for (int64_t o0 = 0; o0 < n_other; o0 += kBN) {
    __syncthreads();  // the previous tile is consumed
    if (threadIdx.x < kBN) {
      const int64_t o = o0 + threadIdx.x < n_other ? o0 + threadIdx.x : -1;
      y_idx[threadIdx.x] = o;
      y_row[threadIdx.x] = load_row<kSq, kClass>(p, o, rm, inv_t);
    }
    __syncthreads();
    float s[kNT][4];
    tile_dot<P>(s, xs, ys, x, x_idx, y, y_idx, in.D, n_chunks, rm);

    // [16, kBN] dots -> ds, in place
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t + (e & 1), h = e >> 1;
        float ds, dsz;
        if (rm) pair_grad<kSq, kClass>(p, y_row[col], own[h], s[j][e], c_dot, ds, dsz);
        else pair_grad<kSq, kClass>(p, own[h], y_row[col], s[j][e], c_dot, ds, dsz);
        s[j][e] = ds;
        rsum[h] += ds;
        rdt[h] += dsz;
      }

    if (p.need_dx) {
      if (n_chunks > 1 && int(blockIdx.y) != n_chunks - 1) {
        // ys holds the last feature chunk: stage this block's slice instead
        __syncthreads();
        load_chunk<P, kBN>(ys, y, y_idx, d0, in.D);
        __syncthreads();
      }
      // dacc[16, kChunk] += ds[16, kBN] . y[kBN, kChunk]; 16-bit inputs: ds rounded to them
      const int64_t d_end = in.D - d0;
#pragma unroll
      for (int kk = 0; kk < kBN / P::kStep; ++kk) {
        uint32_t a[P::kParts][4];
        P::frag_a_acc(s, kk, a);
#pragma unroll
        for (int jn = 0; jn < kDT; ++jn) {
          if (8 * jn < d_end) {
            uint32_t b[P::kParts][2];
            // [kStep, 8]: other rows kk kStep.., features 8 jn..
            P::frag_bt(ys + kk * P::kStep * P::kLd + 8 * jn, P::kLd, lane, b);
            mma_parts<P>(dacc[jn], a, b);
          }
        }
      }
    }
  }

  // each lane summed its own columns: reduce over the quad
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    rsum[h] = quad_sum(rsum[h]);
    rdt[h] = quad_sum(rdt[h]);
  }
  if (p.need_dt && blockIdx.y == 0 && t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (own[h].idx >= 0) p.dt_part[own[h].idx] = rdt[h];
  }
  if (p.need_dx) {
    const T* xg = static_cast<const T*>(x.p);
    T* dx = static_cast<T*>(p.dx);
#pragma unroll
    for (int jn = 0; jn < kDT; ++jn)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = own[e >> 1].idx, d = d0 + 8 * jn + 2 * t + (e & 1);
        if (i < 0 || d >= in.D) continue;
        float v = dacc[jn][e];
        // "dot": dx = 1/T sum ds y;  "sqeuclidean": dx = 2/T (sum ds y - x sum ds)
        if constexpr (kSq) v = 2.f * inv_t * (v - P::to_float(xg[i * x.s_row + d * x.s_col]) * rsum[e >> 1]);
        else v *= inv_t;
        dx[i * p.s_xn + d * p.s_xd] = P::from_float(v);
      }
  }
}

template <class P, bool kSq, bool kClass, bool kRm>
void launch(const BwdParams& p) {
  const int64_t n_own = kRm ? p.in.M : p.in.N;
  const int64_t n_slices = p.need_dx ? (p.in.D + P::kChunk - 1) / P::kChunk : 1;
  const dim3 grid(unsigned((n_own + kBM - 1) / kBM), unsigned(n_slices > 0 ? n_slices : 1));
  const auto kernel = neighbor_bwd_kernel<P, kSq, kClass, kRm>;
  NBK_LAUNCH(kernel, grid, kThreads, p.in.stream, p);
}

}  // namespace

const char* neighbor_bwd_cuda(const BwdParams& p) {
  const int64_t n_own = p.ref_major ? p.in.M : p.in.N;
  if (n_own == 0 || !(p.need_dx || p.need_dt)) return nullptr;
  if (p.need_dx && p.in.D > 65535LL * 64) return "feature dim too large (grid axis y > 65535)";
  with_policy(p.in, [&](auto policy) {
    with_flag(p.in.sqeuclidean, [&](auto sq) {
      with_flag(p.classes, [&](auto cls) {
        with_flag(p.ref_major, [&](auto rm) {
          launch<decltype(policy), decltype(sq)::value, decltype(cls)::value,
                 decltype(rm)::value>(p);
        });
      });
    });
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace nbk
