"""Points at infinity for the fused launchers: the shared handling of rows with infinite
entries (the semantics are written out in ``reference``)."""
import torch

_NAN = float("nan")


def finite_or_zero(x):
    """-inf -> 0 (a row without any term), so that ``s - x`` stays -inf there, not NaN."""
    return torch.where(x == float("-inf"), torch.zeros_like(x), x)


def at_infinity(x):
    """(N,) bool: rows with an infinite entry and no NaN (points at infinity)."""
    return torch.isinf(x).any(1) & torch.logical_not(torch.isnan(x).any(1))


def finite_rows(q, r, metric):
    """Points at infinity for the fused launchers (semantics in ``reference``).

    Returns ``(q, r, q_far, r_far)``. For "sqeuclidean" the rows at infinity are zeroed
    (``r is q`` is kept) and flagged: a launcher gives flagged references weight 0 and
    flagged queries NaN rows with no gradient (:func:`undefined_rows`,
    :func:`silent_rows`). "dot" needs no special case (the direct formula), and
    cosine rows arrive normalized; both return ``None`` flags. One O((N + M) D) pass. On
    the CPU, where asking costs no device synchronisation, a side with no row at infinity
    comes back as it is, with flag ``None``: no copy of it.
    """
    if metric != "sqeuclidean":
        return q, r, None, None
    q_clean, q_far = _zeroed(q)
    if r is q:
        return q_clean, q_clean, q_far, q_far
    r_clean, r_far = _zeroed(r)
    return q_clean, r_clean, q_far, r_far


def _zeroed(x):
    """(x with its rows at infinity zeroed, their flags); on the CPU (x, None) where it
    has none."""
    far = at_infinity(x)
    if x.device.type == "cpu" and not bool(far.any()):
        return x, None
    return torch.where(far.unsqueeze(1), 0.0, x), far


def undefined_rows(x, q_far):
    """Forward outputs: NaN on the rows of queries at infinity."""
    if q_far is None:
        return x
    return x.masked_fill(q_far.view(-1, *([1] * (x.dim() - 1))), _NAN)


def silent_rows(q_far, *xs):
    """Backward inputs (lse, upstream gradients, yhat): 0 at queries at infinity.

    Their (zeroed) query rows then have finite logits <= 0 and a zero upstream gradient,
    so every backend gives them ds = 0: no gradient for them, none from them.
    """
    if q_far is None:
        return xs
    return tuple(None if x is None else
                 x.masked_fill(q_far.view(-1, *([1] * (x.dim() - 1))), 0.0) for x in xs)
