"""The arguments every launch of the Triton kernels passes (``kernels.launch``), from the
kernel inputs: shapes, strides, the logit scale, the flags and the feature-dim blocks."""
import contextlib

import torch
import triton
import triton.language as tl

from . import kernels as tk
from . import rows as tr


def _tl_acc(dtype):
    return tl.float64 if tr.acc_dtype(dtype) == torch.float64 else tl.float32


def _dot_precision(dtype, precision):
    """input_precision for the logit dot: only fp32 inputs have a choice."""
    if dtype != torch.float32:
        return "ieee"
    return precision


def _block(n, cap):
    """Power of two >= n (and >= 16, the smallest tl.dot), at most cap."""
    return max(16, min(triton.next_power_of_2(max(n, 1)), cap))


def _on_device(x):
    """Context of x's CUDA device for a launch (triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _feature_blocks(d, max_resident):
    """(RESIDENT, BLOCK_D, BLOCK_DX): the own tile held whole for D <= max_resident."""
    if d <= max_resident:
        b = _block(d, max_resident)
        return True, b, b
    return False, _block(d, tk.MAX_BLOCK_D), _block(d, tk.MAX_BLOCK_DX)


def _resident_limit(kind, q, precision):
    return tk.resident_limit(kind, q.element_size(), _dot_precision(q.dtype, precision))


def _common(q, r, temperature, metric, offset, has_offset, precision, kind):
    """Kernel arguments shared by every launch of ``kind`` ("fwd", "fwd_class", "bwd",
    "bwd_class")."""
    n, d = q.shape
    m = r.shape[0]
    resident, block_d, _ = _feature_blocks(d, _resident_limit(kind, q, precision))
    return dict(q=q, r=r, scale=tr.logit_scale(temperature, metric), N=n, M=m, D=d,
                offset=offset,
                s_qn=q.stride(0), s_qd=q.stride(1), s_rm=r.stride(0), s_rd=r.stride(1),
                N_KEY=triton.next_power_of_2(max(n, 1)), M_KEY=triton.next_power_of_2(max(m, 1)),
                D_KEY=triton.next_power_of_2(max(d, 1)),
                SQEUCLID=metric == "sqeuclidean", HAS_OFFSET=has_offset, RESIDENT=resident,
                ACC=_tl_acc(q.dtype), PRECISION=_dot_precision(q.dtype, precision),
                BLOCK_D=block_d)
