"""Static performance model of the kernels, read from compiled sm_90 SASS (no GPU needed).

build.py compiles every kernel variant the launchers select (and csrc/cuda/*.cu) for a
deviceless sm_90 target; sass.py finds the main loop of the disassembly and counts its
instructions per query-reference pair; model.py turns those counts into cycles per pair
on H100 pipes; anchor_fa2.py is the calibration kernel; budgets.py holds the regression
budgets; report.py writes bench/results/sass_sm90.json and the tables in bench/sass/README.md.
latency.py simulates a main loop cycle by cycle from the control bits of its SASS (latency,
dependencies, barriers, shared units); latency_report.py checks it against the GPU's
measured points (points.json) and ranks the configs; overlap_probe.py shows what the
compiler does with the MMA / softmax overlap.
Every number here is *predicted from compiled SASS*, never measured.
"""
