"""nbkernels.backends.class_tiles.merge: the class forwards' merge of their class tiles
(Triton and CUDA backends), against the formula in fp64 and on its special rows."""
import math

import torch

from nbkernels.backends import class_tiles

INF, NAN = float("inf"), float("nan")


def test_merge_against_the_formula_at_large_anchors():
    """lse_all = log sum_t s_t exp(m_t), scale_t = exp(m_t - lse_all); anchors near 1e4
    (fp32 logits at T = 0.01): each scale within a few ulps, relative, of the fp64
    formula's, where the old logsumexp(m + log s) was off by eps |m|."""
    g = torch.Generator().manual_seed(0)
    m = 1e4 + torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    s = torch.rand(6, 5, generator=g, dtype=torch.float64) * 100 + 1
    lse = torch.logsumexp(m + s.log(), 1)
    want = torch.exp(m - lse[:, None])
    scale, got_lse = class_tiles.merge(m.float(), s.float())
    eps = torch.finfo(torch.float32).eps
    # the anchors' own rounding to fp32 (eps |m| each) is in the inputs, not the merge
    m32, s32 = m.float().double(), s.float().double()
    want32 = torch.exp(m32 - torch.logsumexp(m32 + s32.log(), 1)[:, None])
    torch.testing.assert_close(scale.double(), want32, rtol=8 * eps, atol=0)
    torch.testing.assert_close(got_lse.double(), lse, rtol=0, atol=4 * eps * 1e4)
    assert (want - want32).abs().max() > 0   # the inputs' rounding, for the record


def test_special_rows():
    """Empty tiles (anchor -inf, sum 0), a row without any reference, +inf and NaN
    anchors: as the formula gives them in fp64 (scale 0 for an empty tile; lse -inf and
    NaN scales for a row without a reference)."""
    m = torch.tensor([[0.0, -INF, 5.0], [-INF, -INF, -INF], [INF, 0.0, 100.0],
                      [NAN, 0.0, 1.0], [2.0, 1.0, -INF], [INF, 100.0, -INF],
                      [-INF, -INF, -INF]], dtype=torch.float64)
    # the last row: a NaN query, whose kernel max dropped its NaN logits (anchors -inf)
    # while its sums kept them
    s = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0],
                      [1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [NAN, NAN, 0.0]], dtype=torch.float64)
    lse = torch.logsumexp(m + s.log(), 1)
    want = torch.exp(m - lse[:, None])
    scale, got = class_tiles.merge(m, s)
    torch.testing.assert_close(scale, want, equal_nan=True)
    torch.testing.assert_close(got, lse, equal_nan=True)
    assert scale[0, 1] == 0 and got[1] == -INF and scale[1].isnan().all()
    # a +inf anchor: NaN for its tile, 0 for the others (finite anchors above exp's range too)
    assert scale[5, 0].isnan() and scale[5, 1] == 0 and scale[5, 2] == 0 and got[5] == INF
    assert got[6].isnan() and scale[6].isnan().all()


def test_whole_tiles_take_their_masses_sum():
    """A tile whose labels all lie in [0, C) takes the sum of its masses in place of its
    sum: its row then sums to exactly what its masses do."""
    m = torch.tensor([[1.0, 3.0]])
    s = torch.tensor([[2.0, 5.0]])
    in_class = torch.tensor([[2.5, 4.0]])
    scale, lse = class_tiles.merge(m, s, in_class, torch.tensor([True, False]))
    z = 2.5 * math.exp(1.0 - 3.0) + 5.0
    torch.testing.assert_close(scale, torch.tensor([[math.exp(-2.0) / z, 1 / z]]))
    torch.testing.assert_close(lse, torch.tensor([3.0 + math.log(z)]))
