"""Regenerate the tables of bench/README.md from bench/results/*.json.

    python bench/report.py                      # rewrite bench/README.md between its markers
    python bench/report.py --print              # print the tables instead
    python bench/report.py --results DIR --print > table.md     # any results folder

Each table sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in the README,
NAME one of cpu-compare, cpu-scaling, gpu-results. Nothing between markers is typed by
hand: every number there comes from a results file (STYLE.md, point 9).
"""
import argparse
import json
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
GiB, MiB = 1 << 30, 1 << 20


def load(results):
    files = {}
    for path in sorted(Path(results).glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "records" in data:
            files[path.stem] = data
        elif isinstance(data, dict) and "project_commit" in data:
            # a GPU run's evidence copied as it was (its own schema, summarized in a .md)
            files[path.stem] = dict(data, summary=path.with_suffix(".md"))
    return files


# ----------------------------------------------------------------------------- formatting
def mem(b):
    if b is None:
        return "-"
    return f"{b / GiB:.2f} GiB" if abs(b) >= GiB else f"{b / MiB:.1f} MiB"


def secs(s):
    if s is None:
        return "-"
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def ratio(a, b):
    return f"{a / b:.3f}x" if a is not None and b else "-"


def machine(env):
    gpu = env.get("gpu_name")
    dev = (f"{gpu}, {mem(env.get('gpu_memory_bytes'))}, CUDA {env.get('cuda')}" if gpu else
           f"{env['cpu_model']}, {env['cpu_cores']} cores ({env['torch_threads']} torch "
           f"threads), {mem(env.get('ram_bytes'))} RAM")
    commit = env.get("git_commit", "?")
    commit = (commit[:12] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit) + \
        (" (dirty)" if env.get("git_dirty") else "")
    return (f"Machine: {dev}. torch {env['torch']}, triton {env.get('triton')}, "
            f"Python {env['python']}; commit {commit}; {env['date']}.")


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


NAMES = {"nbkernels-torch": "nbkernels (torch)", "nbkernels-triton": "nbkernels (triton)",
         "nbkernels-cuda": "nbkernels (cuda)", "pml": "PML NCALoss",
         "reference": "materialized (reference)", "compile": "torch.compile(formula)",
         "flex": "FlexAttention x2", "pykeops": "pykeops"}


def name(p):
    return NAMES.get(p, p)


def status(r, width=140):
    """'ok', or 'skipped: <reason>' / 'error: <reason>', shortened for a table cell."""
    if r["status"] == "ok":
        return "ok"
    reason = (r.get("reason") or "").replace("|", "/").replace("\n", " ")
    text = reason if r["status"] in reason.lower()[:20] else f"{r['status']}: {reason}"
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------- CPU
def cpu_compare(files):
    data = files.get("cpu_compare")
    if not data:
        return "No CPU comparison yet: run `python -m pytest bench/bench_cpu.py -k compare`."
    recs = data["records"]
    pml = next((r for r in recs if r["provider"] == "pml" and r["status"] == "ok"), None)
    ours = next((r for r in recs if r["provider"] == "nbkernels-torch" and r["status"] == "ok"),
                None)
    rows = []
    for r in recs:
        ok = r["status"] == "ok"
        t = r["time_s"]["median"] if ok else None
        notes = []
        if r.get("compile_s") is not None:
            notes.append(f"compile {secs(r['compile_s'])} (first call, excluded)")
        if r.get("codegen_s") is not None:
            notes.append(f"codegen {secs(r['codegen_s'])} at N={r['first_call_n']} (excluded)")
        if not ok:
            notes.append(status(r))
        rows.append([name(r["provider"]), secs(t), r["time_s"]["rounds"] if ok else "-",
                     mem(r.get("peak_extra_bytes")),
                     ratio(t, pml["time_s"]["median"]) if ok and pml else "-",
                     ratio(r.get("peak_extra_bytes"), pml["peak_extra_bytes"]) if ok and pml
                     else "-", "; ".join(notes)])
    r0 = recs[0]
    lines = [f"nca_loss forward+backward, N={r0['n']}, D={r0['d']}, {r0['classes']} classes, "
             f"{r0['dtype']}, T={r0['temperature']}, {r0['metric']}. " + machine(data["env"]), "",
             table(["provider", "time (median)", "rounds", "peak extra memory", "time / PML",
                    "memory / PML", "notes"], rows)]
    if pml and ours:
        tr = ours["time_s"]["median"] / pml["time_s"]["median"]
        mr = ours["peak_extra_bytes"] / pml["peak_extra_bytes"]
        lines += ["", f"Target (issue 2): time <= 0.5x PML: **{'met' if tr <= 0.5 else 'NOT met'}** "
                      f"({tr:.3f}x); peak extra memory <= 0.1x PML: "
                      f"**{'met' if mr <= 0.1 else 'NOT met'}** ({mr:.4f}x)."]
    return "\n".join(lines)


def cpu_scaling(files):
    data = files.get("cpu_scaling")
    if not data:
        return "No scaling sweep yet: run `python -m pytest bench/bench_cpu.py -k scaling`."
    recs = data["records"]
    providers = list(dict.fromkeys(r["provider"] for r in recs))
    sizes = sorted({r["n"] for r in recs})
    by = {(r["provider"], r["n"]): r for r in recs}
    rows = []
    for n in sizes:
        row = [n]
        for p in providers:
            r = by.get((p, n))
            if r is None:
                row.append("-")
            elif r["status"] != "ok":
                row.append(status(r, 60))
            else:
                row.append(f"{secs(r['time_s']['median'])} / {mem(r['peak_extra_bytes'])}")
        rows.append(row)
    growth = []
    for p in providers:
        ok = sorted((r for r in recs if r["provider"] == p and r["status"] == "ok"),
                    key=lambda r: r["n"])
        if len(ok) >= 2:
            a, b = ok[0], ok[-1]
            growth.append(f"{name(p)}: N x{b['n'] / a['n']:.0f} -> time x"
                          f"{b['time_s']['median'] / a['time_s']['median']:.1f}, memory x"
                          f"{b['peak_extra_bytes'] / max(a['peak_extra_bytes'], 1):.1f}")
    r0 = recs[0]
    return "\n".join([
        f"nca_loss forward+backward, time (median) / peak extra memory, D={r0['d']}, "
        f"{r0['classes']} classes, {r0['dtype']}. " + machine(data["env"]), "",
        table(["N"] + [name(p) for p in providers], rows), "", "Growth from the smallest to the largest N measured: "
        + "; ".join(growth) + "." if growth else ""])


# ----------------------------------------------------------------------------- GPU
def _pct(r):
    return f"{r['tflops']:.1f} ({100 * r['peak_fraction']:.0f}%)" if r.get("peak_fraction") \
        else (f"{r['tflops']:.1f}" if r.get("tflops") else "-")


def gpu_nca(recs):
    by = {}
    for r in recs:
        if r["bench"] == "nca_loss":
            by.setdefault((r["dtype"], r["n"], r["d"], r["provider"]), {})[r["mode"]] = r
    rows = []
    for (dtype, n, d, p), modes in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][2] != 128,
                                                                      kv[0][1], kv[0][2])):
        fwd, bwd, fb = modes.get("fwd"), modes.get("bwd"), modes.get("fwdbwd")
        if fb is None or fb["status"] != "ok":
            bad = fb or next(iter(modes.values()))
            rows.append([dtype, n, d, name(p)] + ["-"] * 6 + [status(bad)])
            continue
        rows.append([dtype, n, d, name(p), secs(fwd["time_s"]["median"]), secs(bwd["time_s"]["median"]),
                     secs(fb["time_s"]["median"]), _pct(fwd), _pct(fb),
                     mem(fb["peak_extra_bytes"]), ""])
    return table(["dtype", "N=M", "D", "provider", "fwd", "bwd", "fwd+bwd", "fwd TFLOP/s (% peak)",
                  "fwd+bwd TFLOP/s (% peak)", "peak extra (fwd+bwd)", "notes"], rows)


def gpu_knn(recs):
    rows = []
    for r in sorted((r for r in recs if r["bench"] == "soft_knn_predict"),
                    key=lambda r: (r["dtype"], r["d"] != 128, r["n"], r["d"])):
        ok = r["status"] == "ok"
        rows.append([r["dtype"], r["n"], r["d"], name(r["provider"]),
                     secs(r["time_s"]["median"]) if ok else "-", _pct(r) if ok else "-",
                     mem(r.get("peak_extra_bytes")), "" if ok else status(r)])
    return table(["dtype", "N=M", "D", "provider", "time", "TFLOP/s (% peak)",
                  "peak extra", "notes"], rows)


def gpu_targets(recs):
    """Issue 3's targets at N = M = 65536, D = 128 (and memory at N = 262144)."""
    def get(p, dtype, mode, n=65536, d=128):
        return next((r for r in recs if r["bench"] == "nca_loss" and r["provider"] == p and
                     r["dtype"] == dtype and r["mode"] == mode and r["n"] == n and r["d"] == d
                     and r["status"] == "ok"), None)

    rows = []
    for dtype, mode, goal in (("bfloat16", "fwd", 0.50), ("float32", "fwd", 0.40),
                              ("bfloat16", "fwdbwd", 0.35)):
        r = get("nbkernels-triton", dtype, mode)
        got = r.get("peak_fraction") if r else None
        rows.append([f"{mode} {dtype}: >= {goal:.0%} of dense peak",
                     f"{got:.1%}" if got is not None else "not measured",
                     "-" if got is None else ("met" if got >= goal else "NOT met")])
    for dtype in ("bfloat16", "float32"):
        ours = get("nbkernels-triton", dtype, "fwdbwd")
        rivals = [r for r in (get("flex", dtype, "fwdbwd"), get("compile", dtype, "fwdbwd")) if r]
        if ours and rivals:
            best = min(rivals, key=lambda r: r["time_s"]["median"])
            sp = best["time_s"]["median"] / ours["time_s"]["median"]
            rows.append([f"fwd+bwd {dtype}: >= 1.5x faster than best of flex/compile",
                         f"{sp:.2f}x vs {name(best['provider'])}", "met" if sp >= 1.5 else "NOT met"])
        else:
            rows.append([f"fwd+bwd {dtype}: >= 1.5x faster than best of flex/compile",
                         "not measured", "-"])
    for dtype in ("bfloat16", "float32"):
        r = get("nbkernels-triton", dtype, "fwdbwd", n=262144)
        extra = r["peak_extra_bytes"] - r.get("grad_bytes", 0) if r else None
        rows.append([f"N=262144 {dtype}: extra memory beyond inputs and grads < 1 GB",
                     mem(extra) if r else "not measured",
                     "-" if extra is None else ("met" if extra < 1e9 else "NOT met")])
    return table(["target (N=M=65536, D=128 unless stated)", "measured", "status"], rows)


def evidence(name, data):
    """A GPU run recorded in its own schema: its machine, commit and the table of its
    summary (``.md`` beside the JSON), quoted as they are."""
    summary = data["summary"]
    rows = [line for line in summary.read_text().splitlines() if line.startswith("|")] \
        if summary.exists() else []
    return [f"### {data['machine']['gpu'].split(' (')[0]}, commit {data['project_commit']}, "
            f"{data['date']} (`bench/results/{name}.json`, `{summary.name}`)", "",
            f"{data['machine']['gpu']}; torch {data['machine']['torch']}, "
            f"triton {data['machine']['triton']}. The kernels of commit "
            f"{data['project_commit']}, timed as they were; its correctness findings are in "
            f"the summary. {data['how']['timings']}", "",
            *rows, ""]


def gpu_results(files):
    gpus = {k: v for k, v in files.items() if k.startswith("gpu_")}
    if not gpus:
        return ("None yet: no GPU has been available. `bench/gpu_check.sh` produces them "
                "(see \"GPU\" above).")
    parts = []
    for name, data in gpus.items():
        if "records" not in data:
            parts += evidence(name, data)
            continue
        recs = data["records"]
        parts += [f"### {data['env'].get('gpu_name', name)} (`bench/results/{name}.json`)", "",
                  machine(data["env"]) + " fp32 = fp32 storage with TF32 matmuls.", "",
                  "Targets:", "", gpu_targets(recs), "", "nca_loss (bwd = fwd+bwd - fwd):", "",
                  gpu_nca(recs), "", "soft_knn_predict (forward, no grad):", "", gpu_knn(recs), ""]
    return "\n".join(parts).rstrip()


SECTIONS = {"cpu-compare": cpu_compare, "cpu-scaling": cpu_scaling, "gpu-results": gpu_results}


def render(files):
    return {name: fn(files) for name, fn in SECTIONS.items()}


def update_readme(readme, sections):
    text = readme.read_text()
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"{readme}: markers for {name!r} not found")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    readme.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=BENCH / "results", help="folder of *.json results")
    ap.add_argument("--readme", default=BENCH / "README.md", type=Path)
    ap.add_argument("--print", action="store_true", help="print the tables, write nothing")
    args = ap.parse_args(argv)
    sections = render(load(args.results))
    if args.print:
        for name, body in sections.items():
            print(f"## {name}\n\n{body}\n")
    else:
        update_readme(args.readme, sections)
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
