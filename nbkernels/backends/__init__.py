"""Backends: one module per implementation of the same fused algorithm.

``reference`` is differentiated by autograd and is the oracle. Every fused backend
(``torch``, ``triton``, later ``cuda``) is a module exposing four plain launchers
that take and return tensors. ``nbkernels.autograd`` wraps them in
``torch.autograd.Function``s. Common conventions:

* ``q`` (N, D) and ``r`` (M, D) share one floating dtype and device, any strides.
* ``metric`` is ``"sqeuclidean"`` or ``"dot"``. Cosine reaches the launchers as
  ``"dot"`` on rows that ``nbkernels.autograd`` has already normalized.
* ``temperature`` is a 0-dim tensor on the device (never read on the host).
* ``offset`` is ``None`` (no exclusion) or an int: query ``i`` skips reference ``i + offset``.
* Accumulation is fp32, fp64 for fp64 inputs. Returned row statistics use that dtype.
* lse values are *shifted*: for "sqeuclidean" they are computed from
  ``(2 q.r - ||r||^2) / T`` (the row constant ``-||q||^2/T`` is left out). Rows
  without any term hold ``-inf``. These (lse_all, lse_pos, class mass) are mergeable
  partial states: two chunks of references combine with ``logaddexp``.
* Gradients are those of the *true* logits (the row constant included); each is
  returned in its input's dtype, or ``None`` when its ``need_*`` flag is false.
  When ``q is r`` (the batch loss) a launcher may return the summed gradient as
  ``dq`` and ``None`` as ``dr``: autograd adds the two anyway.

Launchers::

    lse_forward(q, r, q_labels, r_labels, temperature, *, metric, offset)
        -> (lse_all, lse_pos)
    lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos,
                 *, metric, offset, need_q, need_r, need_t) -> (dq, dr, dt)
    probs_forward(q, r, r_labels, temperature, num_classes, *, metric, offset)
        -> (yhat, lse_all)
    probs_backward(q, r, r_labels, temperature, yhat, lse_all, g,
                   *, metric, offset, need_q, need_r, need_t) -> (dq, dr, dt)
"""
BACKENDS = ("reference", "torch", "triton", "cuda")
