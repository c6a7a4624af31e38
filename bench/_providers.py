"""The implementations the benchmarks compare, each as ``make(provider, ...) -> fn``.

Every NCA provider computes the same quantity as ``nbkernels.nca_loss`` with its defaults:
the batch scored against itself, self excluded, metric "sqeuclidean", reduction "mean"
over the queries that have a positive. ``nca_fn(provider, x, labels, T)`` returns a
zero-argument callable giving the scalar loss, so that the harness can time
``fn()`` (forward) or ``fn().backward()`` (forward+backward) the same way for all.

The competitors:

* ``pml``: pytorch-metric-learning's NCALoss with squared Euclidean distances.
* ``reference``: ``nbkernels`` with ``backend="reference"`` (materializes N x N).
* ``compile``: ``plain_nca_loss`` below, plain torch ops, through ``torch.compile``.
* ``flex``: FlexAttention; two calls give ``lse_all`` and ``lse_pos`` (GPU only).
* ``pykeops``: KeOps LazyTensors; symbolic N x N, nothing materialized.
* ``nbkernels-<backend>``: the package itself, e.g. ``nbkernels-torch``.

And an anchor that computes something else: ``sdpa-flash``, torch's scaled dot-product
attention with the FlashAttention-2 backend on q = k = v = x (one head, N x D), the
attention forward (and backward) at the same N and D: twice our matmul work (QK^T and
PV) and one exp per pair, the rate a fused kernel of this shape reaches on the card.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- plain torch
def plain_nca_loss(x, labels, temperature: float):
    """The NCA loss written the obvious way in torch (the formula ``torch.compile`` gets).

    The matmul runs in the input dtype (bf16 on tensor cores); everything after in fp32.
    """
    xf = x.float()
    sq = xf.pow(2).sum(1)
    logits = (2.0 * (x @ x.T).float() - sq[:, None] - sq[None, :]) / temperature
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    logits = logits.masked_fill(eye, NEG_INF)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    valid = pos.any(1)
    lse_all = torch.logsumexp(logits, 1)
    # Rows with no positive get 0 instead of all -inf, so their (masked) gradient is 0, not NaN.
    pos_logits = torch.where(pos, logits, torch.where(valid[:, None], NEG_INF, 0.0))
    lse_pos = torch.logsumexp(pos_logits, 1)
    loss = torch.where(valid, lse_all - lse_pos, 0.0)
    return (loss.sum() / valid.sum().clamp(min=1)).to(x.dtype)


def plain_soft_knn(q, r, r_labels, num_classes: int, temperature: float):
    """Class distribution yhat (N, C) written the obvious way (the formula compiled)."""
    qf, rf = q.float(), r.float()
    logits = (2.0 * (q @ r.T).float() - qf.pow(2).sum(1)[:, None] - rf.pow(2).sum(1)) / temperature
    p = torch.softmax(logits, 1)
    yhat = torch.zeros(q.shape[0], num_classes, dtype=p.dtype, device=q.device)
    return yhat.index_add(1, r_labels, p).to(q.dtype)


_COMPILED = {}


def compiled(fn, dynamic):
    """One ``torch.compile`` wrapper per (function, dynamic), so shapes reuse its cache."""
    key = (fn, dynamic)
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit"):  # a static graph per size in sweeps
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            break
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic, fullgraph=True)
    return _COMPILED[key]


# ----------------------------------------------------------------------------- PML
def pml_available():
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError as e:
        return f"pytorch-metric-learning not importable: {e}"
    return None


def pml_loss(temperature):
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import NCALoss
    return NCALoss(softmax_scale=1.0 / temperature,
                   distance=LpDistance(normalize_embeddings=False, p=2, power=2))


# ----------------------------------------------------------------------------- pykeops
def pykeops_available(device):
    try:
        import pykeops  # noqa: F401
        from pykeops.torch import LazyTensor  # noqa: F401
    except Exception as e:  # ImportError, or a build/config error raised at import
        return f"pykeops not importable: {type(e).__name__}: {e}"
    return None


def pykeops_nca_loss(x, labels, temperature: float):
    """NCA loss with KeOps LazyTensors: the N x N logits exist only symbolically.

    KeOps has no boolean masks, so the excluded pairs get a -1e30 bias built from
    ``sign(|i - j|)`` (0 on the diagonal) and ``1 - sign(|a_i - a_j|)`` (1 for equal
    labels). Index and label values are exact in fp32 below 2**24.
    """
    from pykeops.torch import LazyTensor
    n = x.shape[0]
    idx = torch.arange(n, device=x.device, dtype=x.dtype)
    lab = labels.to(x.dtype)
    x_i, x_j = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
    i_i, i_j = LazyTensor(idx[:, None, None]), LazyTensor(idx[None, :, None])
    a_i, a_j = LazyTensor(lab[:, None, None]), LazyTensor(lab[None, :, None])
    logit = ((x_i - x_j) ** 2).sum(-1) * (-1.0 / temperature)
    not_self = (i_i - i_j).abs().sign()
    same = 1.0 - (a_i - a_j).abs().sign()
    lse_all = (logit - (1.0 - not_self) * 1e30).logsumexp(dim=1).view(n)
    lse_pos = (logit - (1.0 - not_self * same) * 1e30).logsumexp(dim=1).view(n)
    valid = torch.bincount(labels)[labels] > 1
    loss = torch.where(valid, lse_all - lse_pos, torch.zeros_like(lse_all))
    return loss.sum() / valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------- SDPA anchor
def sdpa_available(device, dtype=None):
    if device.type != "cuda":
        return "sdpa-flash: the FlashAttention backend of SDPA runs on CUDA only"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return "sdpa-flash: the FlashAttention backend takes 16-bit inputs only"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
    except ImportError as e:
        return f"torch.nn.attention.sdpa_kernel not importable: {e}"
    return None


def sdpa_anchor(x, temperature: float):
    """Zero-argument callable: FlashAttention-2 (SDPA) over q = k = v = x, summed to a scalar."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qkv = x.view(1, 1, *x.shape)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(qkv, qkv, qkv,
                                                                   scale=1.0 / temperature)
        return out.float().sum()
    return run


# ----------------------------------------------------------------------------- FlexAttention
def flex_available(device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa
    except ImportError as e:
        return f"flex_attention not importable: {e}"
    if device.type != "cuda":
        return "flex: benchmarked on CUDA only (the CPU path is not a competitor here)"
    return None


def _flex_lse(flex, q, v, score_mod, block_mask, scale):
    """Call flex_attention and return lse in natural log, (1, 1, N) -> (N,)."""
    from torch.nn.attention import flex_attention as fa
    if hasattr(fa, "AuxRequest"):  # torch >= 2.9: the aux-output route
        _, aux = flex(q, q, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                      return_aux=fa.AuxRequest(lse=True))
        lse = aux.lse
    else:
        _, lse = flex(q, q, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                      return_lse=True)
    return lse.view(-1)


class FlexNCA:
    """NCA loss as two FlexAttention calls over queries = keys = x as [1, 1, N, D].

    flex computes ``scale * q.k + score_mod``. With ``scale = 2/T`` and ``score_mod``
    adding the per-key bias ``-||r_j||^2 / T`` it yields the shifted logit
    ``(2 q.r - ||r||^2) / T``; the row constant ``-||q||^2/T`` cancels in the loss.
    ``mask_mod`` drops the diagonal (all) and also the other labels (positives). The
    value tensor is a zero [1, 1, N, 16] whose output is discarded: only lse is used.
    Block masks depend on the labels, so they are built per batch (``setup`` below,
    timed separately as ``block_mask_ms``).
    """

    def __init__(self, x, labels, temperature, compile_flex=True):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        self.flex = compiled(flex_attention, False) if compile_flex else flex_attention
        self.x, self.labels, self.t = x, labels, temperature
        n = x.shape[0]
        lab = labels

        def not_self(b, h, qi, kj):
            return qi != kj

        def positive(b, h, qi, kj):
            return (lab[qi] == lab[kj]) & (qi != kj)

        # _compile=True builds the mask block by block instead of as a dense N x N bool.
        kw = dict(B=None, H=None, Q_LEN=n, KV_LEN=n, device=x.device, _compile=compile_flex)
        self.bm_all = create_block_mask(not_self, **kw)
        self.bm_pos = create_block_mask(positive, **kw)
        self.v = torch.zeros(1, 1, n, 16, dtype=x.dtype, device=x.device)
        self.valid = torch.bincount(labels)[labels] > 1

    def __call__(self):
        x, t = self.x, self.t
        n, d = x.shape
        q = x.view(1, 1, n, d)
        bias = x.float().pow(2).sum(1) / t  # differentiable: flex passes grads to captures

        def score_mod(score, b, h, qi, kj):
            return score - bias[kj]

        lse_all = _flex_lse(self.flex, q, self.v, score_mod, self.bm_all, 2.0 / t)
        lse_pos = _flex_lse(self.flex, q, self.v, score_mod, self.bm_pos, 2.0 / t)
        loss = torch.where(self.valid, lse_all.float() - lse_pos.float(), 0.0)
        return loss.sum() / self.valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------- dispatch
def unavailable(provider, device):
    """None if ``provider`` can run on ``device``, else the reason it cannot."""
    if provider == "pml":
        return pml_available()
    if provider == "pykeops":
        return pykeops_available(device)
    if provider == "flex":
        return flex_available(device)
    if provider == "sdpa-flash":
        return sdpa_available(device)
    return None


def nca_fn(provider, x, labels, temperature, *, dynamic=False):
    """Zero-argument callable returning the scalar NCA loss of (x, labels) by ``provider``."""
    import nbkernels
    if provider.startswith("nbkernels-") or provider == "reference":
        backend = "reference" if provider == "reference" else provider.split("-", 1)[1]
        return lambda: nbkernels.nca_loss(x, labels, temperature=temperature, backend=backend)
    if provider == "pml":
        loss = pml_loss(temperature)
        return lambda: loss(x, labels)
    if provider == "compile":
        f = compiled(plain_nca_loss, dynamic)
        return lambda: f(x, labels, temperature)
    if provider == "pykeops":
        return lambda: pykeops_nca_loss(x, labels, temperature)
    if provider == "flex":
        return FlexNCA(x, labels, temperature)
    if provider == "sdpa-flash":
        return sdpa_anchor(x, temperature)
    raise ValueError(f"unknown provider {provider!r}")


def knn_fn(provider, q, r, r_labels, num_classes, temperature, *, dynamic=False):
    """Zero-argument callable returning yhat (N, C) of soft_knn_predict by ``provider``."""
    import nbkernels
    if provider.startswith("nbkernels-") or provider == "reference":
        backend = "reference" if provider == "reference" else provider.split("-", 1)[1]
        return lambda: nbkernels.soft_knn_predict(q, r, r_labels, num_classes,
                                                  temperature=temperature, backend=backend)
    if provider == "compile":
        f = compiled(plain_soft_knn, dynamic)
        return lambda: f(q, r, r_labels, num_classes, temperature)
    raise ValueError(f"soft_knn_predict: no {provider!r} formulation")
