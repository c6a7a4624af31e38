"""What the backends' backward custom ops return under fake tensors (``torch.compile``):
the shapes of the gradients they compute, an empty tensor for each they do not."""


def fake_grads(q, r, temperature, need_q, need_r, need_t, symmetric=False):
    """``(dq, dr, dt)`` placeholders: ``symmetric`` (the batch loss) returns the whole
    gradient as dq and none as dr; dt in the temperature's dtype (the accumulation one)."""
    return (q.new_empty(q.shape if need_q or (symmetric and need_r) else (0,)),
            r.new_empty(r.shape if need_r and not symmetric else (0,)),
            temperature.new_empty(() if need_t else (0,)))
