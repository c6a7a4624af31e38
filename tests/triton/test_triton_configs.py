"""Each GPU autotune config, run explicitly, against backend "torch".

The suite runs the kernels with one fixed config (NBK_TRITON_AUTOTUNE=0, conftest.py),
so the other tuned block sizes (128-row tiles, 8 warps, 3 stages) would otherwise run
only in benchmarks. ``test_every_gpu_config`` runs the i-th forward config with the i-th
backward config (``kernels.GPU_*_CONFIGS``) at D = 128 ("dot") / 130
("sqeuclidean", offset 0: several BLOCK_D chunks and two dq / dr slices) in fp32, fp16
and (GPU only) bf16, comparing the lse, the class probabilities and every gradient with
backend "torch" (fp32 math): on a GPU at N, M ~ 300, and under the interpreter with the
GPU's sizes (NBK_TRITON_SIZES=gpu) at N, M ~ 150. With the interpreter's own sizes the
same comparison runs with its one config on a small case.
"""
import os

import pytest
import torch

from nbkernels.backends import torch as torch_backend

CUDA = os.environ.get("NBK_TEST_DEVICE", "cpu") == "cuda"

# Relative error, in norm over the finite entries. Backend "torch" keeps ds in fp32;
# the kernels round it to 16-bit inputs for the gradient dot and return 16-bit gradients.
# Seen under the interpreter at N, M = 300, 293: fp32 6e-6 (dT), fp16 3.3e-4 (dq, dr).
RTOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
ALL = dict(need_q=True, need_r=True, need_t=True)


def _close_rel(name, got, want, rtol):
    """Same non-finite pattern, and ||got - want|| <= rtol ||want|| over the finite entries."""
    got, want = got.double(), want.double()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), f"{name}: non-finite entries differ"
    err = float((got[fin] - want[fin]).norm())
    ref = float(want[fin].norm())
    assert err <= rtol * ref, f"{name}: relative error {err / max(ref, 1e-300):.2e} > {rtol:.0e}"


def compare_with_torch(tb, h, case, metric, offset, rtol):
    """lse_forward / probs_forward and both backwards of tb against backend "torch"."""
    q, r, a, b, t, c = case.q, case.r, case.a, case.b, case.t, case.c
    gen = torch.Generator().manual_seed(6)
    acc = h.acc_dtype(q.dtype)
    n = q.shape[0]
    g_all, g_pos = (torch.randn(n, generator=gen, dtype=torch.float64).to(acc).to(h.device)
                    for _ in range(2))
    gc = torch.randn(n, c, generator=gen, dtype=torch.float64).to(acc).to(h.device)
    fwd = dict(metric=metric, offset=offset)
    want = torch_backend.lse_forward(q, r, a, b, t, **fwd)
    got = tb.lse_forward(q, r, a, b, t, precision="ieee", **fwd)
    for name, x, y in zip(("lse_all", "lse_pos"), got, want):
        _close_rel(name, x, y, rtol)
    g_pos = torch.where(torch.isinf(want[1]), 0.0, g_pos)
    want_g = torch_backend.lse_backward(q, r, a, b, t, *want, g_all, g_pos, **fwd, **ALL)
    got_g = tb.lse_backward(q, r, a, b, t, *got, g_all, g_pos, precision="ieee", **fwd, **ALL)
    for name, x, y in zip(("lse dq", "lse dr", "lse dT"), got_g, want_g):
        _close_rel(name, x, y, rtol)
    want = torch_backend.probs_forward(q, r, b, t, c, **fwd)
    got = tb.probs_forward(q, r, b, t, c, precision="ieee", **fwd)
    for name, x, y in zip(("yhat", "lse_all (probs)"), got, want):
        _close_rel(name, x, y, rtol)
    want_g = torch_backend.probs_backward(q, r, b, t, *want, gc, **fwd, **ALL)
    got_g = tb.probs_backward(q, r, b, t, *got, gc, precision="ieee", **fwd, **ALL)
    for name, x, y in zip(("probs dq", "probs dr", "probs dT"), got_g, want_g):
        _close_rel(name, x, y, rtol)


def run_with_config(tb, h, fwd_config, bwd_config, n, m, d, dtype):
    """compare_with_torch with the kernels pinned to one config each (None: the table's)."""
    from nbkernels.backends.triton import kernels as tk

    metric, offset = ("sqeuclidean", 0) if d % 2 else ("dot", None)
    # |q - r|^2 ~ 2 D / 16: logits spread over a few units, many references count
    case = h.make_case(n=n, m=m, d=d, c=7, dtype=dtype, scale=0.25, temperature=0.7)
    with tk.fixed_configs(fwd_config, bwd_config):
        compare_with_torch(tb, h, case, metric, offset, RTOL[dtype])


@pytest.mark.parametrize("d", [19, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_current_config(tb, h, dtype, d):
    # the configs the launchers pick (configs), through the helpers of the GPU test
    run_with_config(tb, h, None, None, 37, 29, d, dtype)


from nbkernels.backends.triton import kernels as _tk  # noqa: E402

if CUDA or not _tk.SMALL:
    # on a GPU, and under the interpreter with the GPU's sizes (NBK_TRITON_SIZES=gpu): a
    # case that spans two 128-row tiles there, so that the interpreter stays quick
    _SIZE = (300, 293) if CUDA else (150, 143)
    _DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

    @pytest.mark.parametrize("d", [128, 130])
    @pytest.mark.parametrize("dtype", _DTYPES)
    @pytest.mark.parametrize("i", range(len(_tk.GPU_FWD_CONFIGS)))
    def test_every_gpu_config(tb, h, i, dtype, d):
        run_with_config(tb, h, _tk.GPU_FWD_CONFIGS[i], _tk.GPU_BWD_CONFIGS[i], *_SIZE, d, dtype)


def test_one_config_per_variant(tb, h):
    """Default settings: every kernel variant the launchers run takes one config, whatever
    N and M (the launchers' own bookkeeping, triton_configs.LAUNCHED)."""
    import nbkernels
    from nbkernels.backends.triton import configs as triton_configs

    triton_configs.LAUNCHED.clear()
    for n, m in ((17, 40), (70, 33), (150, 161)):
        x = h.make_case(n=n, m=m, d=20, c=4, dtype=torch.float32)
        q, r = x.q.clone().requires_grad_(), x.r.clone().requires_grad_()
        nbkernels.nca_loss(q, x.a, backend="triton").backward()
        nbkernels.nca_loss(q, x.a, ref_embeddings=r, ref_labels=x.b, backend="triton").backward()
        nbkernels.soft_knn_predict(q.detach(), r.detach(), x.b, 4, backend="triton")
    kinds = {key[0] for key in triton_configs.LAUNCHED}
    assert kinds == {"fwd", "fwd_class", "bwd"}
    for key, configs in triton_configs.LAUNCHED.items():
        assert len(configs) == 1, (key, configs)


def test_warmup_compiles_once_and_reports(tb, h):
    """nbkernels.warmup runs each form once and names the kernel variants it launched the
    first time; a second warm-up finds them all launched."""
    import nbkernels
    from nbkernels.backends.triton import configs as triton_configs

    triton_configs.LAUNCHED.clear()
    first = nbkernels.warmup(torch.float32, 24, forms=("batch", "predict"), num_classes=3,
                             device=h.device, backend="triton", verbose=False)
    assert [r["form"] for r in first] == ["batch", "predict"]
    # the batch loss: the lse forward and its exact pass, the symmetric backward in both
    # forms (one and two exp2 per pair) and its fix-up pass; predict: the class forward
    # and its exact pass
    assert len(first[0]["kernels"]) == 5 and len(first[1]["kernels"]) == 2
    assert sum("one_exp" in k for k in first[0]["kernels"]) == 1
    again = nbkernels.warmup(torch.float32, 24, forms=("batch",), device=h.device,
                             backend="triton", verbose=False)
    assert again[0]["kernels"] == []
    with pytest.raises(ValueError, match="forms must be among"):
        nbkernels.warmup(forms=("nope",), device=h.device)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        nbkernels.warmup(dim=0, device=h.device)
