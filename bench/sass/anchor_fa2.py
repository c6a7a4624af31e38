"""Calibration anchor: a plain FlashAttention-2 style forward in Triton, compiled like ours.

One program owns BLOCK_M = 128 query rows of one head and keeps them in registers; it
streams the keys and values of that head in BLOCK_N = 64 tiles, with an online softmax
in base 2 (the softmax scale times log2(e) folded into one multiplier of the logits, so
each probability is one exp2). Head dim 128, bf16 inputs, fp32 accumulators, 8 warps,
2 stages. Non-causal, no masking (N_CTX a multiple of the blocks): the case of the Triton
"Fused Attention" tutorial's forward benchmark at d = 128, whose measured throughput on
H100 (``MEASURED_TFLOPS``; source in bench/sass/README.md) calibrates the pipe model.

It is never run here: report.py compiles it for sm_90 and counts its main loop like the
kernels of nbkernels. FLOP per query-key pair: 4 * HEAD_DIM (q.k and p.v).
"""
import triton
import triton.language as tl

HEAD_DIM = 128
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES = 128, 64, 8, 2
N_CTX = 16384
# Triton tutorial 06-fused-attention, fwd, non-causal, d = 128, H100 (bench/sass/README.md)
MEASURED_TFLOPS = 477.0
FLOP_PER_PAIR = 4 * HEAD_DIM


@triton.jit
def fa2_fwd_kernel(Q, K, V, Out, qk_scale, s_head, s_row, s_col, N_CTX,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * s_head
    rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    # the query tile, loaded once: [BM, HD]
    q = tl.load(Q + base + rows[:, None] * s_row + cols[None, :] * s_col)
    # exp(x * scale) = exp2(x * scale * log2 e)
    c = qk_scale * 1.4426950408889634
    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, N_CTX, BLOCK_N):
        keys = j + tl.arange(0, BLOCK_N)
        # K^T [HD, BN] and V [BN, HD] of this tile
        kt = tl.load(K + base + keys[None, :] * s_row + cols[:, None] * s_col)
        v = tl.load(V + base + keys[:, None] * s_row + cols[None, :] * s_col)
        s = tl.dot(q, kt) * c
        m_new = tl.maximum(m_run, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_run = m_new
    acc = acc / l_run[:, None]
    tl.store(Out + base + rows[:, None] * s_row + cols[None, :] * s_col, acc.to(Out.dtype.element_ty))


def variant():
    """The anchor as a build.Variant (bf16, 4 heads x N_CTX keys, contiguous [B*H, N, D])."""
    import torch

    from . import build
    bf16 = torch.empty(0, dtype=torch.bfloat16, device="meta")
    values = dict(Q=bf16, K=bf16, V=bf16, Out=bf16, qk_scale=HEAD_DIM ** -0.5,
                  s_head=N_CTX * HEAD_DIM, s_row=HEAD_DIM, s_col=1, N_CTX=N_CTX,
                  HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return build.Variant(name="anchor_fa2_fwd_bf16_128x64w8s2", kind="anchor", dtype="bf16",
                         metric="attention", block_m=BLOCK_M, block_n=BLOCK_N, block_d=0,
                         num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                         config=f"{BLOCK_M}x{BLOCK_N} w{NUM_WARPS} s{NUM_STAGES}",
                         flop_per_pair=FLOP_PER_PAIR, values=values, fn=fa2_fwd_kernel)
