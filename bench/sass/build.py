"""Compile the kernels for sm_90 without a GPU: every Triton variant the launchers select,
the FA-2 anchor, and csrc/cuda/*.cu through nvcc.

Triton variants. ``variants()`` lists one entry per (kernel, input dtype, metric, class
output, REF_MAJOR, autotune config) at the launch the launchers of
nbkernels/backends/triton/__init__.py make for N = M = 65536, D = 128, 100 classes, contiguous
inputs (the problem of bench/README's GPU targets):

* forward without class output = ``lse_forward`` of ``nca_loss`` (the batch against itself,
  self excluded: HAS_OFFSET, offset 0); with class output = ``probs_forward`` of
  ``soft_knn_predict`` (a bank, no offset), BLOCK_C = 16 (``class_block_cap``: M >= 20 C),
  MASS_PRECISION = "tf32x2";
* backward: the dq kernel (REF_MAJOR=False) and the dr kernel (REF_MAJOR=True) of a loss
  with a float temperature (NEED_DX, not NEED_DT); fp16 scales ds (SCALE_DS, ``ds_scale``);
* fp32 runs its dots as TF32 ("tf32": torch's ``allow_tf32``; "ieee" fp32 dots would not
  use tensor cores), bf16 / fp16 dot on tensor cores with fp32 accumulation;
* "cosine" reaches the kernels as "dot" on normalised inputs: no variant of its own.

* every launch passes ``r_col`` (and, backward, ``q_col``): -||x||^2 log2(e)/T per row
  (zeros for "dot"), padded, computed by the launcher. Labels are int32 (dense ranks, or
  class labels with -1 outside [0, C)). D = 128 is RESIDENT: BLOCK_D = BLOCK_DX = 128.
* the batch loss's backward is one SYMMETRIC kernel (``bwd_sym_*``, no class output),
  the other losses' a dq and a dr kernel; the fix-up launch of rows whose positives
  underflow (FIXUP) skips every tile without such a row and is not a variant here.
* configs that ``kernels.fits`` rejects (fp32 at 128 x 128, 3 stages: more
  shared memory than sm_90 has) are left out, as the autotuner's prune leaves them out.

Arguments are built by name from ``fn.params`` (so a new argument does not break the
harness): ``_launch_values`` holds what each launch passes; an argument it does not
know takes its default, else ``None`` (a pointer off: a constexpr, as the JIT makes it)
or, for a constexpr, False (a flag off). Specialisation is the
JIT's own (``native_specialize_impl`` on meta tensors and ints; a copy of its rules where
that function is missing): ints equal to 1 and ``None`` become constexprs, ints divisible
by 16 and pointers get ``tt.divisibility = 16``, ``do_not_specialize`` honoured.
"""
import functools
import hashlib
import inspect
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SM = 90
SM90 = (SM // 10, SM % 10)   # the compute capability whose kernel variants are built
N = M = 65536
D = 128
NUM_CLASSES = 100

# ------------------------------------------------------------------------- tools, compat


def triton_bin():
    """triton's bundled nvidia tools folder (cuobjdump, nvdisasm, ptxas), or None."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return path if path.is_dir() else None


def tool(name):
    b = triton_bin()
    if b is not None and (b / name).exists():
        return str(b / name)
    return shutil.which(name)


def unavailable_reason():
    """None when a deviceless sm_90 Triton compile and its analysis can run here, else why not."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: triton was imported for the interpreter, not for compiling"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton (with an nvidia backend) is not importable: {e}"
    for t in ("cuobjdump", "nvdisasm", "ptxas"):
        if tool(t) is None:
            return f"triton {triton.__version__} ships no {t} (backends/nvidia/bin) and none is on PATH"
    ver = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if ver < (3, 6):
        return (f"triton {triton.__version__}: this harness speaks the ASTSource API of triton "
                ">= 3.6 (signature by argument name, constexprs / attrs by argument path)")
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters and \
            "constants" not in inspect.signature(ASTSource.__init__).parameters:
        return f"triton {triton.__version__}: ASTSource takes neither constexprs nor constants"
    return None


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", SM, 32)


def _specialize(backend, value, is_const, specialize, align):
    """(type string, specialisation string or None), as the JIT's binder computes it."""
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:
        native_specialize_impl = None
    if native_specialize_impl is not None:
        from triton.backends.compiler import BaseBackend
        try:
            return native_specialize_impl(BaseBackend, value, is_const, specialize, align)
        except TypeError:   # another arity in another triton: the Python rules below
            pass
    # the same rules in Python (triton 3.6's runtime/jit.py specialize_impl)
    import torch
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        if specialize and value == 1:
            return "constexpr", 1
        return ty, ("D" if specialize and align and value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.bool: "i1",
                 torch.uint8: "u8", torch.int8: "i8"}
        return "*" + ("k" if is_const else "") + names[value.dtype], \
            ("D" if specialize and align else "")
    raise TypeError(f"cannot specialise {type(value).__name__}")


def ast_source(fn, values):
    """ASTSource of JITFunction ``fn`` for the argument values ``values`` (by name)."""
    from triton.compiler import ASTSource, make_backend
    backend = make_backend(_target())
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, desc = _specialize(backend, v, p.is_const, not p.do_not_specialize,
                               not getattr(p, "do_not_specialize_on_alignment", False))
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = v if desc is None else desc
        elif desc:
            attrs[(i,)] = backend.parse_attr(desc)
    params = inspect.signature(ASTSource.__init__).parameters
    key = "constexprs" if "constexprs" in params else "constants"
    return ASTSource(fn=fn, signature=signature, attrs=attrs, **{key: constexprs}), signature


# ------------------------------------------------------------------------------ variants


@dataclass
class Variant:
    """One compiled kernel: what it is, how it is launched, how its loop maps to pairs."""
    name: str
    kind: str                  # "fwd" | "bwd" | "anchor" | "cuda"
    dtype: str                 # "bf16" | "fp16" | "fp32"
    metric: str = "sqeuclidean"
    cls: bool = False
    ref_major: bool | None = None
    block_m: int = 0           # pairs per main-loop iteration = block_m * block_n
    block_n: int = 0
    block_d: int = 0           # the inner D-loop step (0: no inner loop)
    num_warps: int = 4
    num_stages: int = 0
    config: str = ""
    flop_per_pair: float = 0   # useful FLOP per pair of this kernel (2 D per dot)
    passes: int = 1            # programs that each cover a pair (dx slices recomputing logits)
    values: dict = field(default_factory=dict, repr=False)
    fn: object = field(default=None, repr=False)

    @property
    def inner_trips(self):
        return -(-D // self.block_d) if self.block_d else 1


def _meta(dtype):
    import torch
    return torch.empty(0, dtype=dtype, device="meta")


def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp64": torch.float64}[name]


def _fill_unknown(fn, values):
    """Defaults for arguments this table does not know (added to the kernel since)."""
    out = dict(values)
    for p in fn.params:
        if p.name in out:
            continue
        default = p.default if p.default is not inspect.Parameter.empty else None
        if p.is_constexpr:
            out[p.name] = False if default is None else default   # a flag, off
        else:
            out[p.name] = default   # a pointer (or anything else) off: None
    return out


def _launch_values(kind, dtype, metric, cls, ref_major, bm, bn, d=D, precision=None):
    """The arguments the launchers pass for this variant (the triton backend's args._common)
    at feature dim ``d``; fp32 dots in TF32 unless ``precision`` says "ieee"."""
    import torch
    import triton.language as tl
    from nbkernels.backends.triton import kernels as tk
    D = d  # noqa: N806 (the module's default, shadowed)
    t = _torch_dtype(dtype)
    f32 = _meta(torch.float64 if dtype == "fp64" else torch.float32)  # the accumulation dtype
    i64 = _meta(torch.int64)
    block = lambda n, cap: max(16, min(1 << (max(n, 1) - 1).bit_length(), cap))  # noqa: E731
    i32 = _meta(torch.int32)
    sq = metric == "sqeuclidean"
    prec = precision or ("tf32" if dtype == "fp32" else "ieee")
    limit = tk.resident_limit(kind + ("_class" if cls else ""), _torch_dtype(dtype).itemsize, prec)
    resident = D <= limit
    block_d = block(D, 1 << 30) if resident else block(D, tk.MAX_BLOCK_D)
    # sqeuclidean: the launcher's row norms (+inf at references at infinity)
    common = dict(q=_meta(t), r=_meta(t), scale=f32, N=N, M=M, D=D, offset=0,
                  r_col=f32, s_qn=D, s_qd=1, s_rm=D, s_rd=1, N_KEY=N,
                  M_KEY=M, D_KEY=D, SQEUCLID=sq, HAS_OFFSET=not cls, RESIDENT=resident,
                  ACC=tl.float64 if dtype == "fp64" else tl.float32,
                  PRECISION=prec,
                  BLOCK_D=block_d)
    if kind == "fwd":
        v = dict(common, q_labels=None if cls else i32, r_labels=i32, perm=None,
                 # the lse forward packs each reference's column term and label in one int64
                 r_pack=None if cls or dtype == "fp64" else i64,
                 PACKED=not cls and dtype != "fp64",
                 tile_ptr=i64 if cls else None, lse_all=None if cls else f32,
                 lse_pos=None if cls else f32, mass=f32 if cls else None,
                 # the first pass (POS_PASS=False) flags rows for the rare positives' pass
                 has_pos=None if cls else _meta(torch.int8),
                 redo=_meta(torch.int8), POS_PASS=False,
                 tile_max=f32 if cls else None, tile_sum=f32 if cls else None, CLASS=cls,
                 MASS_PRECISION="ieee" if dtype == "fp64" else "tf32x2",
                 BLOCK_C=block(NUM_CLASSES, tk.class_block_cap(NUM_CLASSES, M)) if cls else 16,
                 BLOCK_M=bm, BLOCK_N=bn)
    else:
        # ref_major: False (dq), True (dr) or "sym" (the batch loss's one kernel)
        v = dict(common, q_labels=None if cls else i32, r_labels=i32,
                 q_col=f32, row_shift=f32, w_neg=f32,
                 w_pos=None if cls else f32, flags=None, g_cls=f32 if cls else None,
                 C=NUM_CLASSES if cls else 0, s_gn=NUM_CLASSES if cls else 0,
                 s_gc=1 if cls else 0,
                 # fp16's ds scale; the one-exp symmetric kernel's weights carry one too
                 ds_scale=f32 if dtype == "fp16" or ref_major == "sym" else None,
                 dx=f32, dt_part=None, s_xn=D, s_xd=1, CLASS=cls,
                 SCALE_DS=dtype == "fp16" or ref_major == "sym",
                 BLOCK_DX=block_d if resident else block(D, tk.MAX_BLOCK_DX),
                 REF_MAJOR=ref_major is True, SYMMETRIC=ref_major == "sym", FIXUP=False,
                 NEED_DX=True, NEED_DT=False, BLOCK_OWN=bm, BLOCK_OTHER=bn,
                 # the symmetric main pass as it runs where the rows allow it (the launcher's
                 # test, rows.one_exp_rows): one exp2 per pair
                 ONE_EXP=ref_major == "sym",
                 sym_w=f32 if ref_major == "sym" else None,
                 one_exp=i32 if ref_major == "sym" else None, s_sw=N if ref_major == "sym" else 0)
    return v


def launch_precision(dtype, precision=None):
    """The ``PRECISION`` a launch passes: fp32 dots in TF32 unless ``precision`` says
    otherwise, "ieee" for every other dtype (``args._dot_precision``)."""
    return (precision or "tf32") if dtype == "fp32" else "ieee"


def with_variant(values, variant):
    """Launch values with the flags of kernel variant ``variant`` (``kernels.VARIANTS``):
    OTHER_T also passes the transposed copies of q and r ([D, rows padded]), the other
    side's row stride M (a multiple of PAD)."""
    out = dict(values, **dict(variant.flags))
    if variant.flag("OTHER_T"):
        t = values["q"].dtype
        out.update(q_t=_meta(t), r_t=_meta(t), s_qt=N, s_rt=M)
    return out


def _config_tuple(cfg, kind):
    kw = cfg.kwargs
    bm, bn = (kw["BLOCK_M"], kw["BLOCK_N"]) if kind == "fwd" else (kw["BLOCK_OWN"], kw["BLOCK_OTHER"])
    return bm, bn, cfg.num_warps, cfg.num_stages


def variants(dtypes=("bf16", "fp16", "fp32"), metrics=("sqeuclidean", "dot"), classes=(False, True),
             kinds=("fwd", "bwd"), configs=None):
    """Every Triton variant (``configs``: indices into GPU_*_CONFIGS, default all)."""
    from nbkernels.backends.triton import kernels as tk
    out = []
    for kind in kinds:
        cfgs = tk.GPU_FWD_CONFIGS if kind == "fwd" else tk.GPU_BWD_CONFIGS
        for ci, cfg in enumerate(cfgs):
            if configs is not None and ci not in configs:
                continue
            bm, bn, w, s = _config_tuple(cfg, kind)
            for dtype in dtypes:
                for metric in metrics:
                    for cls in classes:
                        if not tk.fits(cfg, 4 if dtype == "fp32" else 2, D, cls and kind == "fwd"):
                            continue
                        chosen = tk.variant_for(kind + ("_class" if cls else ""), SM90,
                                                launch_precision(dtype))
                        fn = chosen.kernel
                        rms = (None,) if kind == "fwd" else (False, True) if cls else \
                            (False, True, "sym")
                        for rm in rms:
                            vals = _fill_unknown(fn, with_variant(_launch_values(
                                kind, dtype, metric, cls, rm, bm, bn), chosen))
                            side = {None: "", False: "_dq", True: "_dr", "sym": "_sym"}[rm]
                            name = (f"{kind}{side}"
                                    f"_{dtype}_{metric}{'_class' if cls else ''}"
                                    f"_{bm}x{bn}w{w}s{s}")
                            # useful FLOP per pair: fwd one D-dot; bwd the recomputed logit
                            # dot and the dx dot (the class mass dot is not counted)
                            out.append(Variant(
                                name=name, kind=kind, dtype=dtype, metric=metric, cls=cls,
                                ref_major=rm, block_m=bm, block_n=bn, block_d=vals["BLOCK_D"],
                                num_warps=w, num_stages=s, config=f"{bm}x{bn} w{w} s{s}",
                                flop_per_pair=2 * D if kind == "fwd" else 4 * D,
                                values=vals, fn=fn))
    return out


TABLE_D = {"128": 128, "256": 256, "chunked": 320}   # a feature dim in each bucket
TABLE_D_BWD = {"128": 128, "chunked": 192}
TABLE_DTYPE = {"16": "bf16", "32": "fp32", "32ieee": "fp32", "64": "fp64"}


def _table_precision(dclass):
    """The fp32 dot precision a dtype class names ("32ieee"), else None (the default)."""
    return "ieee" if dclass == "32ieee" else None


def table_variant(arch, kernel=None, dclass=None):
    """The kernel variant (``kernels.VARIANTS``) that runs the config entries ``arch``: for
    "sm90", what an sm_90 launches for ``kernel`` and dtype class ``dclass`` under this
    triton among the variants without entries of their own (the generic kernel, or e.g.
    the ahead forward under triton 3.6); else the variant that names ``arch`` as its
    configs."""
    from nbkernels.backends.triton import kernels as tk
    if arch != "sm90":
        return next(v for v in tk.VARIANTS if v.configs == arch)
    chosen = tk.variant_for(kernel, SM90, launch_precision(TABLE_DTYPE[dclass],
                                                          _table_precision(dclass)))
    if chosen.configs is None:
        return chosen
    return next(v for v in tk.VARIANTS if v.kind == kernel and v.name == "generic")


def table_variants(metric="sqeuclidean", entries=None):
    """One compiled variant per flavour of every sm_90 entry of the launchers' config table
    (``nbkernels/backends/triton/configs.py``; as the installed triton launches it,
    ``configs.table``, or ``entries``): the lse forward, the class forward, the
    dq / dr / symmetric backward, the class dq / dr backward, at a D in the entry's bucket.
    Entries of "sm90" compile what an sm_90 launches with them (``table_variant``), those
    of a variant's own key (e.g. "sm90_tf32t") that variant, with its flags."""
    from nbkernels.backends.triton import configs as tc
    out = []
    entries = tc.table() if entries is None else entries
    for (arch, kernel, dclass, bucket), ((bm, bn, w, s), _) in sorted(entries.items()):
        if not arch.startswith("sm90"):
            continue
        variant = table_variant(arch, kernel, dclass)
        kind, cls = kernel[:3], kernel.endswith("class")
        d = (TABLE_D if kind == "fwd" else TABLE_D_BWD)[bucket]
        dtype = TABLE_DTYPE[dclass]
        jit = variant.kernel
        rms = (None,) if kind == "fwd" else (False, True) if cls else (False, True, "sym")
        for rm in rms:
            vals = _launch_values(kind, dtype, metric, cls, rm, bm, bn, d,
                                  _table_precision(dclass))
            vals = _fill_unknown(jit, with_variant(vals, variant))
            side = {None: "", False: "_dq", True: "_dr", "sym": "_sym"}[rm]
            tag = "" if arch == "sm90" else f"_{arch[len('sm90_'):]}"
            if arch == "sm90" and variant.name != "generic":
                tag = f"_{variant.name}"
            name = (f"table_{kind}{side}_{dclass}_{metric}{'_class' if cls else ''}_d{d}"
                    f"_{bm}x{bn}w{w}s{s}{tag}")
            out.append(Variant(name=name, kind=kind, dtype=dtype, metric=metric, cls=cls,
                               ref_major=rm, block_m=bm, block_n=bn, block_d=vals["BLOCK_D"],
                               num_warps=w, num_stages=s, config=f"{bm}x{bn} w{w} s{s}",
                               flop_per_pair=2 * d if kind == "fwd" else 4 * d, values=vals,
                               fn=jit))
    return out


# ------------------------------------------------------------------------------ compile


def cache_dir():
    d = os.environ.get("NBK_SASS_CACHE")
    path = Path(d) if d else Path(tempfile.gettempdir()) / "nbkernels-sass"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Compiled:
    cubin: Path
    name: str                  # symbol of the kernel in the cubin
    shared: int                # bytes of dynamic shared memory the launch asks for
    num_warps: int
    signature: dict = field(default_factory=dict)


_COMPILED = {}


def compile_triton(fn, values, num_warps, num_stages, tag):
    """Compile ``fn`` at ``values`` for sm_90; the cubin lands in cache_dir(). Memoised."""
    key = (tag, num_warps, num_stages)
    if key in _COMPILED:
        return _COMPILED[key]
    import warnings

    import triton
    src, signature = ast_source(fn, values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # triton 3.9's FP-fusion default notice
        k = triton.compile(src, target=_target(),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    digest = hashlib.sha1(k.asm["cubin"]).hexdigest()[:12]
    path = cache_dir() / f"{tag}-{digest}.cubin"
    path.write_bytes(k.asm["cubin"])
    path.with_suffix(".ptx").write_text(k.asm["ptx"])   # lane addresses: banks.py
    md = k.metadata
    out = Compiled(cubin=path, name=md.name, shared=int(md.shared), num_warps=int(md.num_warps),
                   signature=signature)
    _COMPILED[key] = out
    return out


def compile_variant(v):
    return compile_triton(v.fn, v.values, v.num_warps, v.num_stages, v.name)


# ----------------------------------------------------------------------------- csrc/cuda


def _nvcc():
    """nvcc on PATH, else in torch's idea of CUDA_HOME, else None."""
    from torch.utils.cpp_extension import CUDA_HOME
    cands = [shutil.which("nvcc"), CUDA_HOME and str(Path(CUDA_HOME) / "bin" / "nvcc")]
    return next((c for c in cands if c and Path(c).exists()), None)


def compile_cuda(src):
    """nvcc -cubin -arch=sm_90a -Xptxas -v of one csrc/cuda/*.cu: (cubin path, ptxas log).

    Raises RuntimeError with nvcc's output when it does not compile standalone.
    """
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, CUDA_HOME)")
    from torch.utils.cpp_extension import include_paths
    src = Path(src)
    out = cache_dir() / f"cuda-{src.stem}-{hashlib.sha1(src.read_bytes()).hexdigest()[:12]}.cubin"
    log_path = out.with_suffix(".log")
    if out.exists() and log_path.exists():
        return out, log_path.read_text()
    # the flags of torch's cpp_extension build (as tests/test_cuda_build.py)
    cmd = [nvcc, "-cubin", "-arch=sm_90a", "-Xptxas", "-v", "-std=c++17", "-O3",
           "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", f"-I{ROOT / 'csrc'}",
           *[f"-I{p}" for p in include_paths()], str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src.name}:\n{log[-3000:]}")
    log_path.write_text(log)
    return out, log


@functools.lru_cache(maxsize=None)
def demangle(name):
    cxx = shutil.which("cu++filt") or shutil.which("c++filt")
    if cxx is None:
        return name
    return subprocess.run([cxx, name], capture_output=True, text=True).stdout.strip() or name
