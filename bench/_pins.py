"""What bench/gpu_perf.py pins for a timed row, and what it reads back of what ran: the
kernel variant of some kinds (``kernels.VARIANTS``), the class forward's tile width, the
symmetric backward's form (one or two exp2 per pair), each as a context manager that
undoes itself, and the variants the launchers actually ran."""
import contextlib


def variant_unavailable(name, device, precision):
    """Why backward variant ``name`` does not hold on ``device`` (None if it does)."""
    from nbkernels.backends import variants
    from nbkernels.backends.triton import kernels as tk
    cap = variants.capability(device)
    if name in [v.name for v in variants.applicable(tk.VARIANTS, "bwd", cap, tk.TRITON_VERSION,
                                                    precision)]:
        return None
    return f"backward variant {name!r} does not hold for capability {cap}, precision {precision}"


def launched(kinds):
    """The kernel variants (``kernels.VARIANTS``) of ``kinds`` the launchers ran since
    LAUNCHED was cleared, each known by the flags it sets ("" where none ran)."""
    from nbkernels.backends.triton import configs as tc
    from nbkernels.backends.triton import kernels as tk
    names = set()
    for kind, _, _, flags in tc.LAUNCHED:
        if kind in kinds:
            ran = dict(flags)
            names.add(next(v.name for v in tk.VARIANTS if v.kind == kind
                           and all(ran.get(f) == str(x) for f, x in v.flags)))
    return "+".join(sorted(names))


@contextlib.contextmanager
def class_tile(width):
    """The class forward's class tiles ``width`` wide (None: ``class_block_cap``'s choice)."""
    from nbkernels.backends.triton import kernels as tk
    saved = tk.class_block_cap
    if width:
        tk.class_block_cap = lambda c, m: width
    try:
        yield
    finally:
        tk.class_block_cap = saved


@contextlib.contextmanager
def sym_form(form):
    """The symmetric backward's form: None as the rows allow, "two" the two-exp kernel
    (a spread limit no rows meet); yields the list of the launcher's test results
    (device tensors, read once the timing is done). At every size, so that the check at
    CHECK_N runs the form the timing at the target's 65536 rows runs."""
    from nbkernels.backends.triton import kernels as tk
    from nbkernels.backends.triton import rows as tr
    saved_rows, saved = tr.one_exp_rows, {k: dict(v) for k, v in tk.ONE_EXP_LIMITS.items()}
    saved_min, tk.ONE_EXP_MIN_ROWS = tk.ONE_EXP_MIN_ROWS, 0
    seen = []

    def rows(*args):
        out = saved_rows(*args)
        seen.append(out[1])
        return out
    tr.one_exp_rows = rows
    if form == "two":
        for lim in tk.ONE_EXP_LIMITS.values():
            lim["spread"] = -1.0
    try:
        yield seen
    finally:
        tr.one_exp_rows = saved_rows
        tk.ONE_EXP_MIN_ROWS = saved_min
        for k, v in saved.items():
            tk.ONE_EXP_LIMITS[k].update(v)


def pinned(kinds, name):
    """The kernel kinds ``kinds`` pinned to variant ``name`` (None: nothing pinned)."""
    from nbkernels.backends import variants
    from nbkernels.backends.triton import kernels as tk
    if not name:
        return contextlib.nullcontext()
    return variants.pinned(tk.VARIANTS, kinds, name)
