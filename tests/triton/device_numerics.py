"""Device numerics for Triton's interpreter: the arithmetic the GPU does where it differs.

Triton's interpreter runs a kernel's operations in NumPy: exp2 / log2 / division
correctly rounded and without flushing subnormals, ``tl.dot`` as one ``np.matmul``
(whose rounding depends on where an element sits in the block, and which ignores
TF32), and, before triton 3.9, ``tl.fma`` as a multiply and an add (here then: fp32
through fp64, fp64 by error-free transformations). Compiled for
sm_90, our kernels use (read off their PTX, ``bench/sass``):

* ``tl.math.exp2`` (fp32) -> ``ex2.approx.ftz.f32``: up to 2 ulp of error, subnormal
  inputs and results flushed to zero;
* ``tl.log2`` (fp32) -> libdevice ``log2f`` with flush-to-zero: up to 1 ulp, subnormal
  inputs read as 0;
* fp32 ``/`` -> ``div.full.f32``: up to 2 ulp (exact when the divisor is a power of two);
* ``tl.fma`` -> ``fma.rn``: one rounding;
* ``tl.dot``: fp32 "ieee" as a chain of FMAs along k; "tf32" on tensor cores, each
  input's mantissa cut to 10 bits (the MMA ignores the low 13), products summed
  exactly over k-steps of 8 and added to the fp32 accumulator once per step; fp16 /
  bf16 the same with k-steps of 16; fp64 a chain of FMAs. Every element is computed the
  same way wherever it sits in a tile, as on the device, so a logit recomputed in
  another tile shape, order or orientation comes out the same bits.

The approximate functions get a deterministic error (a hash of the input's bits picks
-2..2 ulp for exp2 and division, -1..1 for log2), so that code which assumes an exact
power of two or an exact quotient fails here as it would on the device. ``install()``
patches the interpreter's builder in this process; ``NBK_DEVICE_NUMERICS=0`` in the
environment leaves the interpreter as it is (``tests/triton/conftest.py``).
"""
import numpy as np

ENV = "NBK_DEVICE_NUMERICS"
_TINY32 = np.float32(2.0 ** -126)


def _ulps(x, spread):
    """A deterministic integer in [-spread, spread] per element, from x's bits."""
    bits = np.ascontiguousarray(x).view(np.uint32).astype(np.uint64)
    h = (bits * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return (h >> np.uint64(20)).astype(np.int64) % (2 * spread + 1) - spread


def _nudge(y, key, spread):
    """y (float32) moved by a deterministic number of ulps; 0, subnormals, inf and NaN
    unchanged."""
    y = np.array(y, dtype=np.float32, copy=True)
    ok = np.isfinite(y) & (np.abs(y) >= _TINY32)
    moved = (y.view(np.int32).astype(np.int64) + _ulps(key, spread)).astype(np.int32)
    y[ok] = moved.view(np.float32)[ok]
    return y


def _ftz(x):
    """fp32 subnormals to (signed) zero."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.abs(x) < _TINY32, np.float32(0) * np.sign(x), x).astype(np.float32)


def ex2_approx_ftz(x):
    """``ex2.approx.ftz.f32``."""
    x = _ftz(x)
    with np.errstate(over="ignore"):
        y = np.exp2(x.astype(np.float64)).astype(np.float32)
    return _ftz(_nudge(_ftz(y), x, 2))


def log2_ftz(x):
    """libdevice ``log2f`` under flush-to-zero."""
    x = _ftz(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log2(x.astype(np.float64)).astype(np.float32)
    return _nudge(y, x, 1)


def div_full(a, b):
    """``div.full.f32``: exact for power-of-two divisors, else up to 2 ulp."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = (a.astype(np.float64) / b.astype(np.float64)).astype(np.float32)
    mant = np.ascontiguousarray(np.abs(b)).view(np.uint32) & np.uint32(0x7FFFFF)
    return np.where(mant == 0, q, _nudge(q, a * np.float32(3) + b, 2)).astype(np.float32)


def fma32(x, y, z):
    x, y, z = (np.ascontiguousarray(v) for v in
               np.broadcast_arrays(*(np.asarray(v, np.float32) for v in (x, y, z))))
    try:
        from triton.runtime.interpreter import _interpreter
        return _interpreter.fma_fp32(x, y, z)
    except (ImportError, AttributeError):  # triton < 3.9: through fp64 (rarely rounds twice)
        return (x.astype(np.float64) * y + z).astype(np.float32)


def _split(a):
    """Veltkamp's split of fp64 ``a`` into two halves of 26 bits: hi + lo == a."""
    c = a * 134217729.0   # 2^27 + 1
    hi = c - (c - a)
    return hi, a - hi


def _fma64_ef(x, y, z):
    """x y + z from error-free transformations (Dekker's product, Knuth's sum): the
    product's rounding error e and the sum's t exactly, then s + (t + e). Rounds once
    but where t + e itself rounds (rare); exact for z = -fl(x y), which is what the
    kernels' residues compute. Where an intermediate is not finite: x y + z."""
    with np.errstate(all="ignore"):
        p = x * y
        xh, xl = _split(x)
        yh, yl = _split(y)
        e = ((xh * yh - p) + xh * yl + xl * yh) + xl * yl
        s = p + z
        zz = s - p
        t = (p - (s - zz)) + (z - zz)
        out = s + (t + e)
        plain = x * y + z
    return np.where(np.isfinite(out) & np.isfinite(e), out, plain)


def fma64(x, y, z):
    x, y, z = (np.ascontiguousarray(v) for v in
               np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (x, y, z))))
    try:
        from triton.runtime.interpreter import _interpreter
        return _interpreter.fma_fp64(x, y, z)
    except (ImportError, AttributeError):  # triton < 3.9
        return _fma64_ef(x, y, z)


def _tf32(x):
    """fp32 with the low 13 mantissa bits cut, as the tensor cores read TF32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def dot(a, b, acc, tf32):
    """a [M, K] @ b [K, N] + acc, as the device computes it (see the module docstring)."""
    k_dim = a.shape[-1]
    if a.dtype == np.float64 or (a.dtype == np.float32 and not tf32):
        fma = fma64 if acc.dtype == np.float64 else fma32
        out = acc.copy()
        a = a.astype(acc.dtype)
        b = b.astype(acc.dtype)
        for k in range(k_dim):
            out = fma(a[:, k:k + 1], b[k:k + 1, :], out)
        return out
    step = 8 if a.dtype == np.float32 else 16
    if a.dtype == np.float32:
        a, b = _tf32(a), _tf32(b)
    a, b = a.astype(np.float64), b.astype(np.float64)
    out = acc.astype(np.float32)
    for k0 in range(0, k_dim, step):
        # the products of one k-step, summed along k the same way for every element
        part = (a[:, k0:k0 + step, None] * b[None, k0:k0 + step, :]).sum(axis=1)
        out = (out.astype(np.float64) + part).astype(np.float32)
    return out.astype(acc.dtype)


def install():
    """Patch the interpreter's builder with the functions above (idempotent)."""
    from triton.runtime import interpreter as interp
    builder = interp.InterpreterBuilder
    if getattr(builder, "_nbk_device_numerics", False):
        return
    handle = interp.TensorHandle

    def unary32(fn, fallback):
        def op(self, arg):
            if arg.data.dtype == np.float32:
                return handle(fn(arg.data), arg.dtype.scalar)
            return fallback(self, arg)
        return op

    def fdiv(self, lhs, rhs, _plain=builder.create_fdiv):
        if lhs.data.dtype == np.float32:
            return handle(div_full(lhs.data, rhs.data), lhs.dtype.scalar)
        return _plain(self, lhs, rhs)

    def fma(self, x, y, z):
        f = fma64 if z.data.dtype == np.float64 else fma32
        if z.data.dtype not in (np.float32, np.float64):
            return handle((x.data.astype(np.float64) * y.data + z.data).astype(z.data.dtype),
                          z.dtype.scalar)
        return handle(f(x.data, y.data, z.data), z.dtype.scalar)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        tf32 = "TF32" in str(input_precision).upper() and "X3" not in str(input_precision).upper()
        if "X3" in str(input_precision).upper():  # 3xTF32 ~ fp32: model it as the FMA chain
            tf32 = False
        return handle(dot(a.data, b.data, d.data, tf32), d.dtype.scalar)

    builder.create_exp2 = unary32(ex2_approx_ftz, builder.create_exp2)
    builder.create_log2 = unary32(log2_ftz, builder.create_log2)
    builder.create_fdiv = fdiv
    builder.create_fma = fma
    builder.create_dot = create_dot
    builder._nbk_device_numerics = True
