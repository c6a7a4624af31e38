"""The latency model's estimate of each form of nbkernels' Gluon main pass for sm_90
(``nbkernels.backends.triton.gluon_lse``, variant "sm90_gluon" of kind "fwd_main"), and a
per-row loss through it in a given form, for ``bench/gpu_perf.py``.

``python bench/gluon_fwd.py`` compiles every form for sm_90 under the installed triton,
without a GPU, and writes the model's estimate of each (``bench/sass/latency.py``) to
``bench/results/gluon_fwd_sm90[_tritonXY].json``: the forms (64 or 128 rows; a tile's
terms read before or after the next wgmma's issue; int32 offsets or int64 tile bases;
rows and references in their order or in label order, the positives' sum then only in
the tiles of the block's labels: the model simulates the loop over the others) rank
differently per triton, and ``gluon_lse.FORMS`` takes each version's best.
``nca_rows`` runs on an sm_90 GPU only (Gluon has no interpreter).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from nbkernels.backends.triton import gluon_lse  # noqa: E402
from nbkernels.backends.triton.gluon_lse import BLOCK_N, D, VERSION, Form  # noqa: E402


def nca_rows(x, y, temperature, f=None):
    """Per-row NCA losses of the batch ``x`` (N, 128) bf16 / fp16 with labels ``y``, self
    excluded: 0 where a row has no positive, as ``nbkernels.nca_loss(...,
    reduction="none")``; the Gluon main pass (form ``f``, None: ``gluon_lse.form()``) and
    nbkernels' exact pass."""
    from nbkernels import kernel_inputs
    from nbkernels.backends.triton import forward
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] != 9:
        raise RuntimeError("the Gluon main pass runs on an sm_90 GPU only (no interpreter)")
    q, _, kmetric = kernel_inputs.prepare(x, x, "sqeuclidean")
    t = torch.as_tensor(temperature, dtype=torch.float32, device=x.device)
    lse_all, lse_pos = forward.lse_forward_passes(
        q, q, y, y, t, kmetric, 0, True, "ieee",
        main=lambda args, grid: gluon_lse.main_pass(args, grid, f))
    return torch.where(torch.isneginf(lse_pos), 0.0, lse_all - lse_pos)


def compile_sm90(f):
    """(cubin path, kernel name, dynamic shared bytes, PTX) of form ``f`` for the batch at
    N = M = 65536, compiled for sm_90 without a GPU."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.sass import build

    def t(dtype):
        return torch.empty(0, dtype=dtype, device="meta")
    values = dict(q=t(torch.bfloat16), r=t(torch.bfloat16), q_labels=t(torch.int32),
                  pack=t(torch.int64), scale=t(torch.float32), has_pos=t(torch.int8),
                  lse_all=t(torch.float32), lse_pos=t(torch.float32), redo=t(torch.int8),
                  order=t(torch.int32), span=t(torch.int32), N=build.N, M=build.M, s_qn=D,
                  s_rn=D, BLOCK_M=f.block_m, BLOCK_N=BLOCK_N, D=D, DIAG=True, AFTER=f.after,
                  WIDE=f.wide, ORDERED=f.ordered)
    kernel = gluon_lse.lse_main_sm90
    src, _ = build.ast_source(kernel, values)
    k = triton.compile(GluonASTSource(kernel, src.signature, src.constants, src.attrs),
                       target=build._target(), options=dict(num_warps=f.num_warps))
    path = build.cache_dir() / f"gluon_lse_main_{f.name}.cubin"
    path.write_bytes(k.asm["cubin"])
    return path, k.metadata.name, int(k.metadata.shared), k.asm["ptx"]


def modelled(f):
    """The latency model's record of form ``f`` (``bench/sass/latency.py``)."""
    from bench.sass import build, latency, overlap_probe
    cubin, name, shared, ptx = compile_sm90(f)
    # ORDERED: the loop over the tiles without the block's labels (all but a few)
    sim = latency.simulate_cubin(cubin, name, shared, f.num_warps, lighter=f.ordered)
    pred = latency.predict(sim.cycles_per_iter, build.M // BLOCK_N, build.N // f.block_m,
                           sim.ctas_per_sm, 2 * build.N * build.M * D)
    seq = overlap_probe._loop(sim.ops)
    pairs = f.block_m * BLOCK_N / (32 * f.num_warps)
    return dict(form=f._asdict(), name=f.name, regs=sim.regs, shared_bytes=shared,
                ctas_per_sm=sim.ctas_per_sm, warp_instrs_per_tile=len(sim.ops),
                instrs_per_pair=len(sim.ops) / pairs,
                loop=" | ".join(f"{t} x{c}" for t, c in seq),
                exps_under_mma=overlap_probe.exps_under_mma(seq),
                ptxas_advice=overlap_probe._ptxas_advice(ptx),
                cycles_per_tile=sim.cycles_per_iter, predicted_latency_model=pred)


def results_path(version=VERSION):
    from bench import _gluon_rows
    return _gluon_rows.results_path("gluon_fwd", version)


def main():
    import json

    from bench.sass import report
    out = results_path()
    forms = []
    for block_m, num_warps in ((64, 4), (128, 8)):
        for after in (False, True):
            for wide in (False, True):
                for ordered in (False, True):
                    r = modelled(Form(block_m, num_warps, after, wide, ordered))
                    forms.append(r)
                print(f"{r['name']}: {r['regs']} regs, {r['ctas_per_sm']} CTA/SM, "
                      f"{r['instrs_per_pair']:.1f} instr/pair, exps under the MMA "
                      f"{r['exps_under_mma']}, {r['cycles_per_tile']:.0f} cycles a tile: "
                      f"{1e3 * r['predicted_latency_model']['time_s']:.2f} ms (predicted)")
    best = min(forms, key=lambda r: r["predicted_latency_model"]["time_s"])
    out.write_text(json.dumps(dict(
        env=report.env(), what=__doc__.split("\n\n")[0], forms=forms, best=best["name"],
        chosen=gluon_lse.form().name), indent=1) + "\n")
    print(f"best {best['name']}; FORMS has {gluon_lse.form().name}; "
          f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
