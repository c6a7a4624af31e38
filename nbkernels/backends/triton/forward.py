"""The forward custom ops of the Triton backend (``nbkernels::triton_lse_fwd``,
``nbkernels::triton_probs_fwd``) and the lse forward's two launches."""
import torch
import triton

from nbkernels.backends import class_tiles
from nbkernels.backends.infinity import finite_rows, undefined_rows

from . import kernels as tk
from . import rows as tr
from .args import _block, _common, _on_device


def lse_forward_passes(q, r, q_labels, r_labels, temperature, metric, offset, has_offset,
                       precision, r_far=None, trace=None, main=None):
    """The lse forward's two launches on kernel inputs (rows at infinity zeroed and, for
    the references, flagged in ``r_far``: ``infinity.finite_rows``): ``(lse_all, lse_pos)``.

    ``main``: a callable ``main(args, grid)`` run in place of the Triton main pass, on its
    launch arguments (``args``: inputs, flags, and the outputs lse_all, lse_pos and redo
    it must write, as ``neighbor_fwd_kernel``'s main pass does); the exact pass then
    recomputes the rows it flags. None: the kind "fwd_main" variant's (``kernels.main_pass``:
    the Gluon one where opted in, ``gluon_lse``), else the Triton kernel's.

    ``trace``: a dict to fill with the intermediates, for diagnostics
    (bench/gpu_diagnose.py): the main pass's lse values, anchor and sums (``main_*``),
    the rows it flagged (``redo``) and the has-a-positive mask.
    """
    n = q.shape[0]
    acc = tr.acc_dtype(q.dtype)
    lse_all = torch.empty(n, dtype=acc, device=q.device)
    lse_pos = torch.empty(n, dtype=acc, device=q.device)
    if n == 0:
        return lse_all, lse_pos
    a, b, order = tr.label_ranks(q_labels, r_labels, order=True)
    has_pos = tr.has_positive(a[:n], b[:r.shape[0]], offset if has_offset else None)
    # the rows for the exact pass (written by the main pass)
    redo = torch.empty(n, dtype=torch.int8, device=q.device)
    r_col = tr.column(r, r_far, metric, temperature)
    packed = acc == torch.float32
    # NaN where the main pass does not write it (another ``main``)
    state = None if trace is None else torch.full((3, n), float("nan"), dtype=acc,
                                                  device=q.device)
    args = dict(q_labels=a, r_labels=b, r_col=r_col, PACKED=packed,
                r_pack=tr.packed(b, r_col) if packed else None, perm=None, self_pos=None,
                tile_ptr=None, r_order=None,
                lse_all=lse_all, lse_pos=lse_pos, has_pos=has_pos, redo=redo, mass=None,
                tile_max=None, tile_sum=None, row_state=state, CLASS=False,
                MASS_PRECISION="ieee", BLOCK_C=16,
                **_common(q, r, temperature, metric, offset, has_offset, precision, "fwd"))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), 1)  # noqa: E731
    with _on_device(q):
        tk.launch_main("fwd", grid, args, main)
        if trace is not None:
            trace.update(main_lse_all=lse_all.clone(), main_lse_pos=lse_pos.clone(),
                         main_anchor=state[0], main_sum=state[1], main_pos_sum=state[2],
                         redo=redo.clone(), has_pos=has_pos.clone())
        # the exact pass (``neighbor_fwd_kernel``): the rows flagged 1 first (both sums,
        # over every reference), then those flagged 2 grouped by label (lse_pos, over
        # their labels' references in label order); its programs past them skip
        order, ptr = tr.label_order(b[:r.shape[0]], n + r.shape[0], order)
        tk.launch("fwd", grid, tune=False, POS_PASS=True,
                  **dict(args, perm=_exact_order(redo, a[:n], n + r.shape[0]), r_order=order,
                         tile_ptr=ptr, row_state=None))
    return lse_all, lse_pos


def _exact_order(redo, a, ranks):
    """(N,) int32 row order of the exact pass: the rows flagged 1 first, then those flagged
    2 grouped by label rank ``a`` (a block of them then spans few references), then the
    others, each in row order; no host sync."""
    key = torch.where(redo == 1, 0, torch.where(redo == 2, a, ranks + 1))
    return torch.argsort(key, stable=True).to(torch.int32)


def _flagged_first(flags):
    """(N,) int32 row order of an exact pass: the rows with a flag first, in order (no host
    synchronisation; the pass's programs past them find none and skip)."""
    return torch.argsort((flags == 0).to(torch.int8), stable=True).to(torch.int32)


@torch.library.custom_op("nbkernels::triton_lse_fwd", mutates_args=())
def _lse_fwd(q: torch.Tensor, r: torch.Tensor, q_labels: torch.Tensor, r_labels: torch.Tensor,
             temperature: torch.Tensor, metric: str, offset: int, has_offset: bool,
             precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, r, q_far, r_far = finite_rows(q, r, metric)
    lse_all, lse_pos = lse_forward_passes(q, r, q_labels, r_labels, temperature, metric, offset,
                                          has_offset, precision, r_far)
    return undefined_rows(lse_all, q_far), undefined_rows(lse_pos, q_far)


@_lse_fwd.register_fake
def _(q, r, q_labels, r_labels, temperature, metric, offset, has_offset, precision):
    acc = tr.acc_dtype(q.dtype)
    return q.new_empty(q.shape[0], dtype=acc), q.new_empty(q.shape[0], dtype=acc)


@torch.library.custom_op("nbkernels::triton_probs_fwd", mutates_args=())
def _probs_fwd(q: torch.Tensor, r: torch.Tensor, r_labels: torch.Tensor,
               temperature: torch.Tensor, num_classes: int, metric: str, offset: int,
               has_offset: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, m, c = q.shape[0], r.shape[0], num_classes
    acc = tr.acc_dtype(q.dtype)
    q, r, q_far, r_far = finite_rows(q, r, metric)
    batch = q is r and has_offset and offset == 0
    block_c, n_tiles = _class_tiles(c, m)
    # references in label order; class tile t owns perm[tile_ptr[t]:tile_ptr[t + 1]]
    labels, perm = torch.sort(r_labels.contiguous(), stable=True)
    bounds = torch.arange(n_tiles + 1, device=q.device, dtype=labels.dtype) * block_c
    tile_ptr = torch.searchsorted(labels, bounds)
    # labels outside [0, C) land in the first / last tile: they count in lse_all, not in yhat
    # (with C = 0, one tile holds every reference)
    tile_ptr[0] = 0
    tile_ptr[-1] = m
    # every column written, those >= C (padding of the last tile) cut off below
    mass = torch.empty(n, n_tiles * block_c, dtype=acc, device=q.device)
    tile_max = torch.empty(n, n_tiles, dtype=acc, device=q.device)
    tile_sum = torch.empty(n, n_tiles, dtype=acc, device=q.device)
    if n > 0:
        with _on_device(q):
            # the references themselves in label order: every tile is a contiguous block
            r_sorted = r[perm]
            # class tiles start anywhere: their vectors padded a tile past M (``padded``)
            r_col = tr.column(r_sorted, None if r_far is None else r_far[perm], metric,
                              temperature, tail=True)
            # per row and class tile: the main pass's flags for the exact pass
            redo = torch.empty(n, n_tiles, dtype=torch.int8, device=q.device)
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), n_tiles)  # noqa: E731
            args = dict(
                q_labels=None, r_labels=tr.class_labels(labels, c, tail=True), r_col=r_col,
                r_pack=None, PACKED=False, perm=None, self_pos=_self_positions(perm, n, offset)
                if has_offset else None, tile_ptr=tile_ptr, r_order=None,
                lse_all=None, lse_pos=None, has_pos=None, redo=redo, row_state=None, mass=mass,
                tile_max=tile_max, tile_sum=tile_sum, CLASS=True,
                # p in [0, 1]: tf32 would cost 1e-3 of yhat; a hi + lo split of p in two TF32 dots
                # ("tf32x2" in the kernel) is near fp32, and the one-hot is exact
                MASS_PRECISION="ieee" if acc == torch.float64 else "tf32x2", BLOCK_C=block_c,
                **_common(q, r_sorted, temperature, metric, offset, has_offset, precision,
                          "fwd_class"))
            # a main-pass variant gets, for the batch (its queries are the references),
            # their label order
            tk.launch_main("fwd_class", grid, args, order=perm if batch else None)
            # the exact pass (each tile's max) for the rows a class tile flagged, taken
            # first: the programs past them skip, with no host synchronisation
            rows = redo.amax(1)
            tk.launch("fwd_class", grid, tune=False, POS_PASS=True,
                      **dict(args, perm=_flagged_first(rows), redo=rows))
    # merge the class tiles (relative to the row's largest anchor, and for the tiles whose
    # labels all lie in [0, C) from the sum of their masses: ``class_tiles``)
    whole = torch.ones(n_tiles, dtype=torch.bool, device=q.device)
    if m:
        whole[0] &= labels[0] >= 0
        whole[-1] &= labels[-1] < c
    scale, lse_all = class_tiles.merge(tile_max, tile_sum,
                                       mass.view(n, n_tiles, block_c).sum(2), whole)
    return undefined_rows(_scaled_mass(mass, scale, c, block_c), q_far), \
        undefined_rows(lse_all, q_far)


def _scaled_mass(mass, scale, c, block_c):
    """(N, C) yhat: each class tile's columns of ``mass`` (N, tiles * BLOCK_C) times its
    ``scale`` (N, tiles), the padding columns of the last tile dropped: one read of the
    mass and one write, into a plain (N, C) tensor (the fake's)."""
    n, full = mass.shape[0], c // block_c
    out = mass.new_empty(n, c)
    w = full * block_c
    torch.mul(mass[:, :w].view(n, full, block_c), scale[:, :full, None],
              out=out[:, :w].view(n, full, block_c))
    if w < c:
        torch.mul(mass[:, w:c], scale[:, full:full + 1], out=out[:, w:])
    return out


def _self_positions(perm, n, offset):
    """(N,) int32: where query i's excluded reference i + offset sits among the references
    in label order (``perm``: their original indices), -1 where it is not a reference."""
    m = perm.shape[0]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(m, device=perm.device, dtype=perm.dtype)
    j = torch.arange(n, device=perm.device, dtype=torch.int64) + offset
    inside = (j >= 0) & (j < m)
    return torch.where(inside, inv[j.clamp(0, max(m - 1, 0))] if m else j, -1).to(torch.int32)


def _class_tiles(c, m):
    """(BLOCK_C, number of class tiles): at least one tile, so that C = 0 still has lse_all."""
    block_c = _block(c, tk.class_block_cap(c, m))
    return block_c, max(1, triton.cdiv(c, block_c))


@_probs_fwd.register_fake
def _(q, r, r_labels, temperature, num_classes, metric, offset, has_offset, precision):
    acc = tr.acc_dtype(q.dtype)
    return (q.new_empty(q.shape[0], num_classes, dtype=acc),
            q.new_empty(q.shape[0], dtype=acc))
