"""bench/gpu_perf.py, the speed check prepared for the next GPU, run here in its dry mode:
the same code on the CPU through the Triton interpreter with the GPU's tile configs
(NBK_TRITON_SIZES=gpu), at tiny sizes. Every variant it would time must pass its check
against backend "torch" and be timed; the providers that need CUDA are recorded as
skipped with their reason; the table lists every record."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_perf_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", NBK_TRITON_SIZES="gpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_perf.py"), "--dry",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_perf.json").read_text())
    assert data["env"]["dry"] is True
    assert data["env"]["inputs"].startswith("rows N(0, 0.3^2)")
    records = data["records"]
    ours = [r for r in records if r["name"].startswith("nbkernels") and "main_pass" not in r]
    # the table's configs and the other candidates, bf16 (fp16 here) and fp32, fwd and fwdbwd
    assert len(ours) >= 7
    assert {(r["mode"], r["dtype"]) for r in ours} == {
        ("fwd", "float16"), ("fwdbwd", "float16"), ("fwd", "float32"), ("fwdbwd", "float32")}
    for r in ours:
        assert r["status"] == "ok", r
        assert 0 <= r["check_rel_err"] < 5e-3 and r["time_s"]["median"] > 0
    assert len({(r["fwd_config"] and tuple(r["fwd_config"])) for r in ours if r["mode"] == "fwd"}) >= 3
    # the TF32 backward both ways: the sm_90 transposed variant and the generic kernel
    assert {r["bwd_variant"] for r in ours if (r["mode"], r["dtype"]) == ("fwdbwd", "float32")} \
        == {"sm90_tf32_transposed", "generic"}
    # the 16-bit loss forward both ways: the launcher's choice and the other variant
    assert {r["fwd_variant"] for r in ours if (r["name"], r["mode"], r["dtype"])
            == ("nbkernels-triton", "fwd", "float16")} == {"sm90_fwd_ahead", "generic"}
    # soft_knn_predict at the class forward's table config and the next best predicted
    # (the class forward's entry of the running triton's table JSON, ranked by the model)
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_perf
    ranked = gpu_perf._candidates("fwd_class")
    assert ranked[0][2] and not ranked[1][2]
    knn = [r for r in ours if r["name"] == "nbkernels-triton-knn" and not r.get("class_tile")]
    assert [r["fwd_config"] and tuple(r["fwd_config"]) for r in knn] == [None, ranked[1][0]]
    assert [r["predicted_s"] for r in knn] == [ranked[0][1], ranked[1][1]]
    assert all(r["predicted_s"] > 0 and "predicted_latency_s" not in r for r in knn)
    # the symmetric backward both ways on unit-norm rows: one exp2 per pair, then two
    unit = [r for r in ours if r.get("inputs") == "unit-norm rows"]
    assert [(r["sym_one_exp"], r.get("sym_form")) for r in unit if r["mode"] == "fwdbwd"] \
        == [([1], None), ([0], "two")]
    # the forward on both kinds of rows, with the rows the exact pass redid
    fwd = [r for r in ours if (r["mode"], r["dtype"], r["fwd_config"]) == (
        "fwd", "float16", ours[0]["fwd_config"]) and "exact_rows" in r]
    assert [r.get("inputs") for r in fwd[:2]] == [None, "unit-norm rows"]
    assert all(set(r["exact_rows"]) == {"both", "positives"} for r in fwd)
    by_name = {r["name"]: r for r in records}
    for cuda_only in ("sdpa-flash", "flex"):
        assert by_name[cuda_only]["status"] == "skipped" and "CUDA" in by_name[cuda_only]["reason"]
    # the Gluon main passes (variant "sm90_gluon"), the loss forward and forward+backward
    # and soft_knn_predict through nbkernels, and the loss forward's second-best form
    # (predicted), skipped off an sm_90 GPU
    import _gluon_rows
    gluon = [r for r in records if r.get("main_pass") == "sm90_gluon"]
    assert [(r["name"], r["mode"]) for r in gluon] == [
        ("nbkernels-triton", "fwd"), ("nbkernels-triton", "fwdbwd"),
        ("nbkernels-triton-knn", "fwd")]
    assert gluon[2]["class_tile"] == 16 and gluon[2]["predicted_s"] == \
        _gluon_rows.class_prediction() > 0
    best, second = _gluon_rows.candidates()
    assert gluon[0]["predicted_s"] == best[2]
    forms = [r for r in records if r["name"].startswith("v4-gluon ")]
    assert [r["name"].split()[-1] for r in forms] == [second[1]]
    assert forms[0]["predicted_s"] == second[2] > 0
    assert all(r["status"] == "skipped" and "sm_90" in r["reason"] for r in gluon + forms)
    assert by_name["anchor-fa2"]["status"] == "ok"
    assert by_name["compile"]["status"] == "ok"
    table = (tmp_path / "gpu_perf.md").read_text().splitlines()
    assert len(table) == 2 + len(records) and table == proc.stdout.strip().splitlines()[-len(table):]


def test_clock_samples_reach_the_records_timed_while_they_were_taken(tmp_path):
    """gpu_perf.sh samples nvidia-smi every 100 ms (clocks.csv, local-time stamps); each
    timed record gets the median SM clock, memory clock, largest power and count of the
    samples inside its timing window; lines that do not parse are left out, and a record
    without a window, or with no sample in it, gets nothing."""
    import datetime

    sys.path.insert(0, str(ROOT / "bench"))
    import _harness as H

    t = 1_790_000_000.0

    def line(dt, sm, mem="2619", power="612.40", temp="51"):
        stamp = datetime.datetime.fromtimestamp(t + dt).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        return f"{stamp}, {sm}, {mem}, {power}, {temp}"
    assert H.CLOCK_QUERY.split(",")[:2] == ["timestamp", "clocks.sm"]
    clocks = tmp_path / "clocks.csv"
    clocks.write_text("\n".join([
        line(0.0, 1980), line(1.0, 1755), line(1.1, 1740, power="690.10"), line(1.2, 1980),
        line(1.3, "[N/A]"), line(5.0, 1830), "2026/12/05 19:5"]) + "\n")
    samples = H.read_clocks(clocks)
    assert [s[1] for s in samples] == [1980, 1755, 1740, 1980, 1830]
    assert samples[1][0] == pytest.approx(t + 1.0, abs=1e-3)
    result = tmp_path / "gpu_perf.json"
    timed = {"median": 1e-3, "t_unix": [t + 0.95, t + 1.25]}
    result.write_text(json.dumps({"env": {}, "records": [
        {"name": "a", "status": "ok", "time_s": timed},
        {"name": "b", "status": "ok", "time_s": {"median": 1e-3, "t_unix": [t + 2, t + 3]}},
        {"name": "c", "status": "ok", "time_s": {"median": 1e-3}},
        {"name": "d", "status": "skipped"}]}))
    assert H.annotate_clocks(result, clocks) == 1
    recs = json.loads(result.read_text())["records"]
    assert {k: recs[0][k] for k in ("sm_clock_mhz", "mem_clock_mhz", "power_w_max",
                                    "clock_samples")} == {
        "sm_clock_mhz": 1755, "mem_clock_mhz": 2619, "power_w_max": 690.1, "clock_samples": 3}
    assert not any("sm_clock_mhz" in r for r in recs[1:])
    # no sample file (no nvidia-smi): nothing changes
    assert H.annotate_clocks(result, tmp_path / "none.csv") == 0


def test_gpu_perf_sh_samples_the_clocks_while_it_times(tmp_path):
    """gpu_perf.sh, with a stand-in nvidia-smi (a sample every 100 ms, as -lms 100) and a
    stand-in bench/gpu_perf.py (one record timed over 0.6 s, then stopped by the script's
    timeout): the sampler runs while the records are timed and they are annotated after,
    the timeout included."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        "#!/usr/bin/env bash\n"
        "case \"$*\" in *-lms*) while :; do\n"
        "  echo \"$(date '+%Y/%m/%d %H:%M:%S.%3N'), 1755, 2619, 600.5, 50\"; sleep 0.1; done;;\n"
        "esac\necho fake\n")
    # the stand-in for gpu_perf.py: one record timed over 0.6 s, then hangs until killed
    stub = tmp_path / "stub.py"
    stub.write_text(
        "import json, sys, time\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "t0 = time.time(); time.sleep(0.6)\n"
        "rec = {'name': 'x', 'status': 'ok', 'time_s': {'median': 1e-3, 't_unix': [t0, time.time()]}}\n"
        "open(out + '/gpu_perf.json', 'w').write(json.dumps({'env': {}, 'records': [rec]}))\n"
        "time.sleep(60)\n")
    # and for the ladder's timing: two rungs timed over 0.3 s each
    ladder = tmp_path / "ladder_stub.py"
    ladder.write_text(
        "import json, sys, time, triton\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "recs = []\n"
        "for name in ('exp', 'mma'):\n"
        "    t0 = time.time(); time.sleep(0.3)\n"
        "    recs.append({'name': name, 'rung': name, 'config': '-', 'status': 'ok',\n"
        "                 'time_s': {'median': 2e-3, 't_unix': [t0, time.time()]}})\n"
        "env = {'triton': triton.__version__}\n"
        "open(out + '/ladder.json', 'w').write(json.dumps({'env': env, 'records': recs}))\n")
    py = fake / "py"
    py.write_text(f"#!/usr/bin/env bash\n"
                  f"if [ \"$1\" = bench/gpu_perf.py ]; then shift; exec {sys.executable} {stub} \"$@\"; fi\n"
                  f"if [ \"$1 $2\" = \"bench/sass/ladder.py --time\" ]; then shift; exec {sys.executable} {ladder} \"$@\"; fi\n"
                  f"exec {sys.executable} \"$@\"\n")
    for f in (fake / "nvidia-smi", py):
        f.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", PYTHON=str(py), OUT=str(out),
               GPU_PERF_TOTAL_S="4")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_perf.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 124, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "TIMED OUT" in proc.stdout
    assert "gpu_perf records with the clocks of their timing: 1" in proc.stdout
    assert "ladder records with the clocks of their timing: 2" in proc.stdout
    rec = json.loads((out / "gpu_perf.json").read_text())["records"][0]
    assert rec["sm_clock_mhz"] == 1755 and rec["clock_samples"] >= 3
    # the ladder against its predictions, at the sampled clock (bench/sass/ladder.py)
    table = (out / "ladder.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| exp", "| mma"]
