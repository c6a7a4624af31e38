// torch binding of the CUDA kernels in csrc/cuda/: op schemas (TORCH_LIBRARY), their CUDA
// implementations (TORCH_LIBRARY_IMPL), and the empty Python module nbkernels._C whose
// import runs both registrations. The fake (meta) implementations and the glue around the
// ops (norms, label sorting, merges, the dT reduction) are in nbkernels/backends/cuda.py.
//
// Only generic c10 headers: the current stream comes through c10::Stream::native_handle,
// so this file compiles against any torch build, CPU-only included. Built with
// NBK_HOST_EMULATION (tests/cuda/emulation.py only), the same ops take CPU tensors and
// run the kernels' source on the host through tests/cuda/emulator.h.
#include <Python.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "cuda/neighbor_cuda.h"

#ifdef NBK_HOST_EMULATION
#define NBK_DISPATCH_KEY CPU
#else
#define NBK_DISPATCH_KEY CUDA
#endif

namespace {

using at::Tensor;
constexpr c10::DeviceType kOpDevice = c10::DeviceType::NBK_DISPATCH_KEY;

nbk::Dtype dtype_of(const Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat,
              "nbkernels cuda ops take float16, bfloat16 or float32 embeddings, got ", t);
  return t == at::kHalf ? nbk::Dtype::f16 : t == at::kBFloat16 ? nbk::Dtype::bf16 : nbk::Dtype::f32;
}

// rows can be read as 16-byte vectors: aligned base and row stride, unit feature stride
bool vec_ok(const Tensor& x) {
  return x.stride(1) == 1 && (x.stride(0) * x.element_size()) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
}

cudaStream_t current_stream(const Tensor& x) {
#ifdef NBK_HOST_EMULATION
  (void)x;
  return nullptr;
#else
  const c10::Stream s = c10::impl::getDeviceGuardImpl(kOpDevice)->getStream(x.device());
  return static_cast<cudaStream_t>(s.native_handle());
#endif
}

// 1-D contiguous row data of length n, dtype st, on x's device
void check_rows(const Tensor& t, const char* name, int64_t n, at::ScalarType st, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == st && t.is_contiguous(), name, " must be a contiguous ", st,
              " tensor, got ", t.scalar_type());
}

const Tensor& required(const std::optional<Tensor>& t, const char* name) {
  TORCH_CHECK(t.has_value(), name, " is required here");
  return *t;
}

nbk::Inputs make_inputs(const Tensor& q, const Tensor& r, const Tensor& temperature,
                        const Tensor& q_sqnorm, const Tensor& r_sqnorm, bool sqeuclidean,
                        bool need_q_sqnorm, int64_t offset, bool has_offset) {
  TORCH_CHECK(q.device().type() == kOpDevice, "q must be a ", kOpDevice, " tensor, got ",
              q.device());
  TORCH_CHECK(q.dim() == 2 && r.dim() == 2, "q and r must be 2-D, got ", q.sizes(), " and ",
              r.sizes());
  TORCH_CHECK(r.device() == q.device(), "r must be on ", q.device(), ", got ", r.device());
  TORCH_CHECK(r.scalar_type() == q.scalar_type(), "q and r must share a dtype, got ",
              q.scalar_type(), " and ", r.scalar_type());
  TORCH_CHECK(r.size(1) == q.size(1), "q and r must share the feature dim, got ", q.size(1),
              " and ", r.size(1));
  TORCH_CHECK(temperature.device() == q.device() && temperature.numel() == 1 &&
                  temperature.scalar_type() == at::kFloat,
              "temperature must be one float32 element on ", q.device());
  nbk::Inputs in{};
  in.dtype = dtype_of(q);
  in.sqeuclidean = sqeuclidean;
  in.has_offset = has_offset;
  in.offset = offset;
  in.N = q.size(0);
  in.M = r.size(0);
  in.D = q.size(1);
  in.q = q.const_data_ptr();
  in.s_qn = q.stride(0);
  in.s_qd = q.stride(1);
  in.q_vec = vec_ok(q);
  in.r = r.const_data_ptr();
  in.s_rm = r.stride(0);
  in.s_rd = r.stride(1);
  in.r_vec = vec_ok(r);
  in.temperature = temperature.const_data_ptr<float>();
  if (sqeuclidean) {
    check_rows(r_sqnorm, "r_sqnorm", in.M, at::kFloat, q);
    in.r_sqnorm = r_sqnorm.const_data_ptr<float>();
    if (need_q_sqnorm) {
      check_rows(q_sqnorm, "q_sqnorm", in.N, at::kFloat, q);
      in.q_sqnorm = q_sqnorm.const_data_ptr<float>();
    }
  }
  in.stream = current_stream(q);
  return in;
}

void check_launch(const char* err) {
  TORCH_CHECK(err == nullptr, "nbkernels CUDA kernel launch failed: ", err);
}

// (lse_all, lse_pos), each (N,) fp32, shifted for "sqeuclidean"
std::tuple<Tensor, Tensor> lse_fwd(const Tensor& q, const Tensor& r, const Tensor& q_labels,
                                   const Tensor& r_labels, const Tensor& temperature,
                                   const Tensor& r_sqnorm, bool sqeuclidean, int64_t offset,
                                   bool has_offset) {
  const c10::DeviceGuard guard(q.device());
  nbk::FwdParams p{};
  p.in = make_inputs(q, r, temperature, Tensor(), r_sqnorm, sqeuclidean, false, offset, has_offset);
  check_rows(q_labels, "q_labels", p.in.N, at::kLong, q);
  check_rows(r_labels, "r_labels", p.in.M, at::kLong, q);
  Tensor lse_all = at::empty({p.in.N}, q.options().dtype(at::kFloat));
  Tensor lse_pos = at::empty({p.in.N}, q.options().dtype(at::kFloat));
  p.q_labels = q_labels.const_data_ptr<int64_t>();
  p.r_labels = r_labels.const_data_ptr<int64_t>();
  p.lse_all = lse_all.mutable_data_ptr<float>();
  p.lse_pos = lse_pos.mutable_data_ptr<float>();
  check_launch(nbk::neighbor_fwd_cuda(p));
  return {lse_all, lse_pos};
}

// (mass (N, C), tile_max (N, n_tiles), tile_sum (N, n_tiles)), fp32; see FwdParams
std::tuple<Tensor, Tensor, Tensor> class_fwd(const Tensor& q, const Tensor& r,
                                             const Tensor& r_labels_sorted, const Tensor& perm,
                                             const Tensor& tile_ptr, const Tensor& temperature,
                                             const Tensor& r_sqnorm, int64_t num_classes,
                                             int64_t block_c, bool sqeuclidean, int64_t offset,
                                             bool has_offset) {
  const c10::DeviceGuard guard(q.device());
  TORCH_CHECK(block_c == nbk::kClassTile, "block_c must be ", nbk::kClassTile, ", got ", block_c);
  TORCH_CHECK(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  nbk::FwdParams p{};
  p.in = make_inputs(q, r, temperature, Tensor(), r_sqnorm, sqeuclidean, false, offset, has_offset);
  p.classes = true;
  p.C = num_classes;
  p.n_tiles = (num_classes + block_c - 1) / block_c;
  check_rows(r_labels_sorted, "r_labels_sorted", p.in.M, at::kLong, q);
  check_rows(perm, "perm", p.in.M, at::kLong, q);
  check_rows(tile_ptr, "tile_ptr", p.n_tiles + 1, at::kLong, q);
  Tensor mass = at::empty({p.in.N, num_classes}, q.options().dtype(at::kFloat));
  Tensor tile_max = at::empty({p.in.N, p.n_tiles}, q.options().dtype(at::kFloat));
  Tensor tile_sum = at::empty({p.in.N, p.n_tiles}, q.options().dtype(at::kFloat));
  p.r_labels = r_labels_sorted.const_data_ptr<int64_t>();
  p.perm = perm.const_data_ptr<int64_t>();
  p.tile_ptr = tile_ptr.const_data_ptr<int64_t>();
  p.mass = mass.mutable_data_ptr<float>();
  p.tile_max = tile_max.mutable_data_ptr<float>();
  p.tile_sum = tile_sum.mutable_data_ptr<float>();
  check_launch(nbk::neighbor_fwd_cuda(p));
  return {mass, tile_max, tile_sum};
}

// (dx, dt_part): dq (ref_major false) or dr (true) in the input dtype, or an empty tensor
// without need_dx; dt_part (n_own,) fp32, or empty without need_dt.
std::tuple<Tensor, Tensor> bwd(const Tensor& q, const Tensor& r,
                               const std::optional<Tensor>& q_labels, const Tensor& r_labels,
                               const Tensor& temperature, const Tensor& q_sqnorm,
                               const Tensor& r_sqnorm, const Tensor& lse_all,
                               const std::optional<Tensor>& lse_pos,
                               const std::optional<Tensor>& g_all,
                               const std::optional<Tensor>& g_pos,
                               const std::optional<Tensor>& g_cls,
                               const std::optional<Tensor>& delta, bool sqeuclidean,
                               int64_t offset, bool has_offset, bool ref_major, bool need_dx,
                               bool need_dt) {
  const c10::DeviceGuard guard(q.device());
  nbk::BwdParams p{};
  p.in = make_inputs(q, r, temperature, q_sqnorm, r_sqnorm, sqeuclidean, true, offset, has_offset);
  const int64_t n = p.in.N;
  p.classes = g_cls.has_value();
  p.ref_major = ref_major;
  p.need_dx = need_dx;
  p.need_dt = need_dt;
  check_rows(r_labels, "r_labels", p.in.M, at::kLong, q);
  check_rows(lse_all, "lse_all", n, at::kFloat, q);
  p.r_labels = r_labels.const_data_ptr<int64_t>();
  p.lse_all = lse_all.const_data_ptr<float>();
  if (p.classes) {
    const Tensor& g = *g_cls;
    const Tensor& dl = required(delta, "delta");
    TORCH_CHECK(g.device() == q.device() && g.dim() == 2 && g.size(0) == n &&
                    g.scalar_type() == at::kFloat,
                "g_cls must be a float32 (", n, ", C) tensor on ", q.device(), ", got ", g.sizes());
    check_rows(dl, "delta", n, at::kFloat, q);
    p.g_cls = g.const_data_ptr<float>();
    p.s_gn = g.stride(0);
    p.s_gc = g.stride(1);
    p.C = g.size(1);
    p.delta = dl.const_data_ptr<float>();
  } else {
    const Tensor& a = required(q_labels, "q_labels");
    const Tensor& lp = required(lse_pos, "lse_pos");
    const Tensor& ga = required(g_all, "g_all");
    const Tensor& gp = required(g_pos, "g_pos");
    check_rows(a, "q_labels", n, at::kLong, q);
    check_rows(lp, "lse_pos", n, at::kFloat, q);
    check_rows(ga, "g_all", n, at::kFloat, q);
    check_rows(gp, "g_pos", n, at::kFloat, q);
    p.q_labels = a.const_data_ptr<int64_t>();
    p.lse_pos = lp.const_data_ptr<float>();
    p.g_all = ga.const_data_ptr<float>();
    p.g_pos = gp.const_data_ptr<float>();
  }
  const Tensor& x = ref_major ? r : q;
  Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor dt_part = at::empty({need_dt ? x.size(0) : 0}, q.options().dtype(at::kFloat));
  if (need_dx) {
    p.dx = dx.mutable_data_ptr();
    p.s_xn = dx.stride(0);
    p.s_xd = dx.stride(1);
  }
  if (need_dt) p.dt_part = dt_part.mutable_data_ptr<float>();
  check_launch(nbk::neighbor_bwd_cuda(p));
  return {dx, dt_part};
}

}  // namespace

TORCH_LIBRARY(nbkernels, m) {
  m.def("cuda_lse_fwd(Tensor q, Tensor r, Tensor q_labels, Tensor r_labels, Tensor temperature, "
        "Tensor r_sqnorm, bool sqeuclidean, int offset, bool has_offset) -> (Tensor, Tensor)");
  m.def("cuda_class_fwd(Tensor q, Tensor r, Tensor r_labels_sorted, Tensor perm, "
        "Tensor tile_ptr, Tensor temperature, Tensor r_sqnorm, int num_classes, int block_c, "
        "bool sqeuclidean, int offset, bool has_offset) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_bwd(Tensor q, Tensor r, Tensor? q_labels, Tensor r_labels, Tensor temperature, "
        "Tensor q_sqnorm, Tensor r_sqnorm, Tensor lse_all, Tensor? lse_pos, Tensor? g_all, "
        "Tensor? g_pos, Tensor? g_cls, Tensor? delta, bool sqeuclidean, int offset, "
        "bool has_offset, bool ref_major, bool need_dx, bool need_dt) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nbkernels, NBK_DISPATCH_KEY, m) {
  m.impl("cuda_lse_fwd", &lse_fwd);
  m.impl("cuda_class_fwd", &class_fwd);
  m.impl("cuda_bwd", &bwd);
}

// `import nbkernels._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
