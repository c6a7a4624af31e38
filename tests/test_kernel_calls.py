"""The Triton kernels' calls to their tile helpers (``_fwd_lse_tile``, ``_bwd_tile``: 33
and 50 parameters) cannot pass an argument to the wrong parameter: a positional argument
is the caller's variable of the parameter's own name, and everything that differs between
calls (the tile's position, the DIAG / FIRST / POS_PASS flags) goes by keyword. Checked on
the source, for every ``triton.jit`` helper of more than MANY parameters."""
import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "nbkernels" / "backends" / "triton"
MANY = 8


def _helpers_and_calls():
    trees = {p.name: ast.parse(p.read_text()) for p in sorted(KERNELS.glob("*.py"))}
    defs = {n.name: [a.arg for a in n.args.args] for t in trees.values() for n in ast.walk(t)
            if isinstance(n, ast.FunctionDef) and len(n.args.args) > MANY
            and any(ast.unparse(d) == "triton.jit" for d in n.decorator_list)}
    calls = [(f, n) for f, t in trees.items() for n in ast.walk(t)
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) in defs]
    return defs, calls


def test_the_tile_helpers_are_checked():
    defs, calls = _helpers_and_calls()
    assert {"_fwd_lse_tile", "_bwd_tile"} <= set(defs)
    assert {n.func.id for _, n in calls} >= {"_fwd_lse_tile", "_bwd_tile"}


@pytest.mark.parametrize("index", range(len(_helpers_and_calls()[1])))
def test_positional_arguments_are_their_parameters(index):
    defs, calls = _helpers_and_calls()
    file, call = calls[index]
    params = defs[call.func.id]
    where = f"{file}:{call.lineno} {call.func.id}"
    for i, arg in enumerate(call.args):
        assert isinstance(arg, ast.Name) and arg.id == params[i], (
            f"{where}: positional argument {i} is {ast.unparse(arg)!r}, not {params[i]!r}; "
            "pass it by keyword")
    names = [k.arg for k in call.keywords]
    assert set(params) == {*params[:len(call.args)], *names}, f"{where}: missing arguments"
    for k in call.keywords:
        assert k.arg in params[len(call.args):], f"{where}: {k.arg}= is not a later parameter"
