"""The class forwards' last step, shared by the Triton and CUDA backends: per row, the
class tiles' partial sums merged into the row's log-sum-exp and each tile's factor.

A class forward leaves, per row and class tile t, its anchor ``tile_max[t]`` (a logit),
its sum ``tile_sum[t]`` and its class masses, both relative to exp(tile_max[t]). Then

    lse_all = log sum_t tile_sum[t] exp(tile_max[t]),   yhat = mass[t] exp(tile_max[t] - lse_all).

Written that way in floating point, ``tile_max + log(tile_sum)`` is rounded at the size
of the logits (|logit| 1e4 at T = 0.01 and distances of 100): every yhat then carries a
relative error of eps |logit|, its row no longer sums to 1, and the backward, which
relies on it (``delta = sum_c g_c yhat_c``), loses as much in the rows one class
dominates. Here the tiles are merged relative to the row's largest anchor: each factor
is exp of a difference of two anchors over a sum of terms at most the tile count
(``w[t] = exp(tile_max[t] - top)``, ``scale[t] = w[t] / sum_t tile_sum[t] w[t]``), so yhat
keeps the precision of its terms at any logit size.

Where a tile's class masses are summed with less precision than its sum (the Triton
class forward's TF32 hi + lo split of p keeps 22 of its 24 bits), the rows would sum to
1 only to that precision, which the backward's ``delta`` amplifies in the rows one class
dominates. A tile whose references all have a label in [0, C) (``whole``) has a sum equal
to its masses' (each reference's term lies in one class), so the merge takes the masses'
sum there (``in_class``): the row then sums to 1 to fp32 rounding, and lse_all is as
precise as the masses.
"""
import torch


def merge(tile_max, tile_sum, in_class=None, whole=None):
    """(scale (N, tiles), lse_all (N,)) from the class tiles' anchors and sums (N, tiles);
    ``in_class`` (N, tiles): each tile's class masses summed, taken in place of its sum
    where ``whole`` (tiles,) holds.

    Rows whose largest anchor is not finite, as the formula gives them: a row without any
    reference lse_all -inf and scales NaN (yhat NaN); anchors -inf with a NaN sum (a NaN
    query) NaN; a +inf anchor lse_all +inf and scale NaN (0 for the other tiles); a NaN
    anchor NaN. An empty tile (anchor -inf, sum 0) gets scale 0."""
    if in_class is not None:
        tile_sum = torch.where(whole, in_class, tile_sum)
    top = tile_max.amax(1, keepdim=True)
    finite = torch.isfinite(top)
    safe = torch.where(finite, top, torch.zeros_like(top))
    w = torch.exp(tile_max - safe)
    z = (tile_sum * w).sum(1, keepdim=True)
    # rows whose top is not finite (-inf: no reference, or a NaN query whose max dropped
    # its NaN logits while its sum kept them; +inf; NaN): the formula's values as they are
    lse = torch.logsumexp(tile_max + tile_sum.log(), 1, keepdim=True)
    scale = torch.where(finite, w / z, torch.exp(tile_max - lse))
    return scale, torch.where(finite, safe + z.log(), lse).squeeze(1)
