"""The oracle's own check: ``nbkernels.backends.reference``, the other fp64 formula,
against the one written here (bound once, by tests/test_conformance_torch.py)."""
import pytest
import torch

from helpers import assert_match
import launcher_cases as cases
from nbkernels.backends import reference

from .harness import API_METRICS, F64, INF, NAN, OFFSETS, TOL
from .oracle import _leaves, oracle_rows

@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("metric", API_METRICS)
def test_reference_matches_oracle(metric, offset):
    """nbkernels.backends.reference, the other oracle, against the one written here."""
    atol, rtol = TOL[F64]
    case = cases.make_case("cpu", dtype=F64, c=5)
    case.q[4, 2], case.r[6, 0] = INF, -INF   # points at infinity
    case.q[8, 1] = NAN

    def ref(q, r, t):
        lse_all, lse_pos = reference.neighbor_lse(q, r, case.a, case.b, t, metric=metric,
                                                  offset=offset)
        yhat = reference.class_probs(q, r, case.b, t, case.c, metric=metric, offset=offset)
        return lse_all, lse_pos, yhat

    def ours(q, r, t):
        return oracle_rows(q, r, case.a, case.b, t, case.c, metric, offset)[:3]

    outs = []
    for fn in (ref, ours):
        leaves = _leaves(case)
        got = fn(*leaves)
        total = sum(x.masked_fill(~torch.isfinite(x), 0.0).sum() * (k + 1)
                    for k, x in enumerate(got))
        grads = torch.autograd.grad(total, leaves) if metric != "dot" else ()
        outs.append([x.detach() for x in got] + list(grads))
    assert_match(outs[0], outs[1], atol, rtol, what=f"reference {metric} offset={offset}")
