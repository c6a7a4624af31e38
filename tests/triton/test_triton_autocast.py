"""Autocast does not lower the fused kernels' accumulation: under ``torch.autocast`` the
inputs keep their dtype (fp32 here) and the result equals the fp32 computation outside
autocast, on the interpreter (CPU autocast, fp16) and on a GPU (CUDA autocast, fp16 and
bf16; run by bench/gpu_check.sh). The oracle is the fp64 reference."""
import pytest
import torch

import nbkernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_autocast_keeps_fp32_accumulation(h, dtype, metric):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(37, 19, generator=g, dtype=torch.float64)
    bank = torch.randn(29, 19, generator=g, dtype=torch.float64)
    y, by = torch.randint(0, 4, (37,), generator=g), torch.randint(0, 4, (29,), generator=g)
    want = nbkernels.nca_loss(x, y, ref_embeddings=bank, ref_labels=by, temperature=0.5,
                              metric=metric, backend="reference")
    xf, bf = x.float().to(h.device), bank.float().to(h.device)
    yd, byd = y.to(h.device), by.to(h.device)
    with torch.autocast(torch.device(h.device).type, dtype=dtype):
        got = nbkernels.nca_loss(xf, yd, ref_embeddings=bf, ref_labels=byd, temperature=0.5,
                                 metric=metric, backend="triton")
    assert got.dtype == torch.float32
    # fp32 accumulation: ~1e-6 relative; a 16-bit logit product would be ~1e-3
    torch.testing.assert_close(got.double().cpu(), want, atol=0, rtol=2e-5)
