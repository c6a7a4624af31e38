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
