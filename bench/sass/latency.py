"""A latency- and dependency-aware estimate of a main loop on sm_90: a cycle simulation of
the SASS the compiler scheduled, where ``model.py`` only counts issue slots per pipe.

*Predicted from compiled SASS*, never measured. What it reads, per instruction of the main
loop (``sass.main_loop``), from ``nvdisasm -hex``: the control bits ptxas wrote beside each
sm_90 instruction (bits 105-125 of the 128-bit word):

* ``stall`` (4 bits): cycles before the warp may issue its next instruction, which covers
  every fixed-latency dependency (FFMA, IMAD, ...) as the compiler counted it;
* ``wbar`` / ``rbar`` (3 bits each, 7 = none): the scoreboard an instruction of variable
  latency sets, released when its result is written (``wbar``) or its sources read
  (``rbar``);
* ``wait`` (6 bits): the scoreboards an instruction waits for before it issues.

What it simulates: the warps of ``ctas`` CTAs on one SM, each on sub-partition
``warp % 4``, running ``iters`` iterations of the loop body in order (inner loops repeated
by their trip count). Each sub-partition issues at most one instruction per cycle, from
the oldest ready warp. Shared units: per sub-partition the MUFU (4 lanes: 8 cycles per
warp instruction) and the integer pipe (16 lanes: 2 cycles); per SM the tensor cores
(``model.TENSOR_RATE`` FLOP per cycle, an HGMMA / HMMA queued behind the previous one) and
shared-memory bandwidth (128 B per cycle), which LDS / STS / LDSM, the writes of cp.async
(LDGSTS) and wgmma's operand reads (B, and A unless it comes from registers) share; an
LDS / STS / LDSM takes the wavefronts its lanes' addresses need (``banks.py``: bank
conflicts, from the PTX). Synchronisation: ``BAR.SYNC`` waits for every warp of its CTA;
``WARPGROUP.DEPBAR.LE gsb0, k`` for all but the last ``k`` HGMMA groups of the warp;
``DEPBAR.LE SBx, k`` for all but the last ``k`` committed ``LDGDEPBAR``
groups of cp.async loads.

Latencies (``LATENCY``) are the one set of free constants: published microbenchmarks of
Hopper (Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture",
IPDPS 2024) and of earlier parts (Jia et al., "Dissecting the NVIDIA Volta / Turing GPU
Architecture via Microbenchmarking") put shared-memory loads near 30 cycles, MUFU near
20, an L2 hit near 260 and DRAM near 500-600; they are inputs, stated, not fitted. The
steady state is read between iterations ``warmup`` and ``iters``: cycles per iteration
of the whole SM, hence cycles per pair. The estimate is of one SM's main loop; the grid's
tail (its last partial wave) is applied by :func:`predict`.
"""
from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass

from . import banks, build, model, sass

# cycles from issue to the release of the scoreboard an instruction sets (wbar)
LATENCY = {"MUFU": 20, "LDS": 30, "LDSM": 30, "LDG": 500, "LDGSTS": 500, "S2R": 20,
           "SHFL": 25, "HMMA": 32, "F2F": 14, "I2F": 14, "F2I": 14, "POPC": 14, "FLO": 14,
           "BREV": 14, "REDUX": 30, "LDC": 30, "ULDC": 30, "S2UR": 20, "VOTE": 10,
           "ATOMS": 40, "LD": 500, "LDL": 500}
DEFAULT_LATENCY = 20
READ_RELEASE = 6          # cycles until a variable-latency instruction has read its sources
HGMMA_LATENCY = 24        # beyond the tensor-pipe time of the last HGMMA of a group
SMEM_BYTES_PER_CYCLE = 128
# wgmma's shared-memory operand reads count against SMEM_BYTES_PER_CYCLE
WGMMA_SMEM = True
# LDS / STS / LDSM cost the wavefronts their lanes' addresses take (banks.py, from the PTX)
BANK_CONFLICTS = True
WGMMA_BYTES = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1}
MUFU_CYCLES, INT_CYCLES = 8, 2
INT_PIPE = ("IADD3", "LOP3", "ISETP", "SHF", "LEA", "SEL", "IABS", "PRMT", "SGXT", "IMNMX",
            "VIMNMX", "POPC", "FLO", "BMSK", "BREV", "PLOP3", "P2R", "R2P")

HEX = re.compile(r"/\*\s*0x([0-9a-f]{16})\s*\*/\s*$")


@dataclass
class Op:
    """One instruction as the simulation sees it."""
    base: str
    op: str
    args: str
    stall: int
    wbar: int
    rbar: int
    wait: int
    tensor: float = 0.0        # tensor-core cycles of the SM per warp issue
    smem_bytes: int = 0


def control(hi):
    """(stall, yield, wbar, rbar, wait mask, reuse) of the high 64 bits of an instruction."""
    c = hi >> 41
    return c & 0xF, (c >> 4) & 1, (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 0x3F, (c >> 17) & 0xF


def disassemble(cubin):
    """{function: (sass.Function, {address: high 64 bits})} from ``nvdisasm -c -hex``."""
    text = subprocess.run([build.tool("nvdisasm"), "-c", "-hex", str(cubin)],
                          capture_output=True, text=True, check=True).stdout
    funcs, cur, pending, last = {}, None, [], None
    for line in text.splitlines():
        m = sass.FUNC.match(line)
        if m:
            func = sass.Function(m.group(1))
            cur = funcs.setdefault(m.group(1), (func, {}))
            pending, last = [], None
            continue
        if cur is None:
            continue
        m = sass.LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = sass.INSTR.match(line)
        if m:
            ins = sass.Instr(int(m.group(1), 16), m.group(2) or "", m.group(3), m.group(4).strip())
            for lab in pending:
                cur[0].labels[lab] = ins.addr
            pending, last = [], ins
            cur[0].instrs.append(ins)
            continue
        m = HEX.search(line)
        if m and last is not None and line.strip().startswith("/*"):
            cur[1][last.addr] = int(m.group(1), 16)   # the second word: control bits
            last = None
    return funcs


def _smem_bytes(ins):
    """Bytes one warp moves through shared memory: LDS / STS / LDSM, the writes of a
    cp.async (LDGSTS; charged when it issues: when its data lands is not modelled),
    wgmma's operand reads; 0 otherwise."""
    parts = ins.op.split(".")
    if ins.base == "LDSM":
        # LDSM.16.M88.4: four 8x8 matrices of 16-bit elements (128 B each) per warp
        n = next((int(p) for p in parts[2:] if p in ("1", "2", "4")), 4)
        return 128 * n
    if ins.base in ("LDS", "STS", "LDGSTS"):
        # LDS.64 / .128, LDS.U8 / .S16, LDGSTS.E.BYPASS.128 ...; 32 bits when no width
        # is written
        width = next((int(p.lstrip("US")) for p in parts[1:]
                      if p.lstrip("US").isdigit() and p.lstrip("US") in ("8", "16", "32", "64",
                                                                         "128")), 32)
        return 32 * width // 8
    if ins.base == "HGMMA" and WGMMA_SMEM:
        # the operands wgmma reads from shared memory: B always, A unless it comes from
        # registers (SASS: the second operand is a register, not a descriptor); one
        # warpgroup instruction, seen by each of its 4 warps
        m, n, k = (int(x) for x in parts[1].split("x"))
        size = next((WGMMA_BYTES[p] for p in parts[2:] if p in WGMMA_BYTES), 2)
        a_smem = ins.args.split(",")[1].strip().startswith("gdesc")
        return ((m * k if a_smem else 0) + n * k) * size / 4
    return 0


def loop_banks(cubin, func, num_warps, lighter=False):
    """({SASS address: wavefronts}, summary) of the main loop's shared-memory accesses
    (``banks.for_loop``, from the PTX beside ``cubin``); nothing with BANK_CONFLICTS off."""
    main = sass.main_loop(func, num_warps, lighter)
    if main is None or not BANK_CONFLICTS:
        return {}, dict(ptx=False, sass_accesses=0, matched=0, conflicted=0)
    return banks.for_loop(cubin, [i for i in func.instrs if main.start <= i.addr <= main.end],
                          num_warps)


def body(func, hi, num_warps, inner_trips, waves=None, lighter=False):
    """The main loop of ``func`` (``sass.main_loop``, ``lighter``) as a list of Op, inner
    loops repeated ``inner_trips`` times (an int, or a callable as in ``sass._weights``).
    ``waves`` ({address: wavefronts}, ``loop_banks``): what each shared-memory access
    costs; one not in it is conflict-free."""
    main = sass.main_loop(func, num_warps, lighter)
    if main is None:
        return None
    trip = inner_trips if callable(inner_trips) else (lambda lp, i, parent: inner_trips)
    waves = waves or {}

    def ops_of(ins):
        stall, _, wbar, rbar, wait, _ = control(hi.get(ins.addr, 0))
        flop, ty, _ = sass.mma_flop(ins, num_warps)
        cycles = flop / num_warps / model.TENSOR_RATE[ty] if flop else 0.0
        smem = 128 * waves[ins.addr] if ins.addr in waves else _smem_bytes(ins)
        return Op(ins.base, ins.op, ins.args, stall, wbar, rbar, wait, cycles, smem)

    def walk(lp):
        out, addr_children = [], {c.start: (i, c) for i, c in enumerate(lp.children)}
        instrs = [i for i in func.instrs if lp.start <= i.addr <= lp.end]
        k = 0
        while k < len(instrs):
            ins = instrs[k]
            if ins.addr in addr_children and ins.addr != lp.start:
                i, child = addr_children[ins.addr]
                out += walk(child) * max(1, int(trip(child, i, lp)))
                while k < len(instrs) and instrs[k].addr <= child.end:
                    k += 1
                continue
            if ins.base not in ("NOP", "BRA"):
                out.append(ops_of(ins))
            k += 1
        return out
    return walk(main)


def _depbar_keep(args):
    m = re.search(r",\s*(0x[0-9a-f]+|\d+)", args)
    return int(m.group(1), 0) if m else 0


class _Warp:
    def __init__(self, wid, cta):
        self.wid, self.cta, self.pc, self.iter = wid, cta, 0, 0
        self.ready = 0.0
        self.sb = [0.0] * 6
        self.mma_groups, self.mma_open = [], 0.0     # completion times of HGMMA groups
        self.cp_groups, self.cp_open = [], 0.0       # of committed cp.async (LDGDEPBAR) groups
        self.at_barrier = None
        self.iter_end = []


def simulate(ops, num_warps, ctas=1, iters=6, warmup=2):
    """Cycles per main-loop iteration of one SM in steady state."""
    warps = [_Warp(c * num_warps + w, c) for c in range(ctas) for w in range(num_warps)]
    mufu_free, int_free = [0.0] * 4, [0.0] * 4
    tensor_free, smem_free = 0.0, 0.0
    barrier = {}                       # (cta, count) -> arrivals / release time
    t = 0.0
    n = len(ops)
    while any(w.iter < iters for w in warps):
        for sp in range(4):
            cands = [w for w in warps if w.wid % 4 == sp and w.iter < iters]
            cands.sort(key=lambda w: (w.iter, w.pc, w.wid))   # the oldest first
            for w in cands:
                if w.ready > t:
                    continue
                op = ops[w.pc]
                need = max([w.sb[b] for b in range(6) if op.wait >> b & 1] + [0.0])
                if need > t:
                    continue
                if w.at_barrier is not None:
                    key = w.at_barrier
                    if barrier.get(key, (0, None))[1] is None or barrier[key][1] > t:
                        continue
                    w.at_barrier = None
                    _advance(w, op, t, n)
                    break
                if op.base == "BAR" and ".SYNC" in op.op or op.op == "BAR":
                    key = (w.cta, "bar", w.iter, w.pc)
                    got, rel = barrier.get(key, (0, None))
                    got += 1
                    rel = t + 1 if got == num_warps else None
                    barrier[key] = (got, rel)
                    w.at_barrier = key
                    continue
                if op.base == "WARPGROUP" and "DEPBAR" in op.op:
                    keep = _depbar_keep(op.args)
                    done = w.mma_groups[:-keep] if keep else w.mma_groups
                    if max(done + [0.0]) > t:
                        continue
                elif op.base == "DEPBAR":
                    keep = _depbar_keep(op.args)
                    done = w.cp_groups[:-keep] if keep else w.cp_groups
                    if max(done + [0.0]) > t:
                        continue
                if op.base == "MUFU" and mufu_free[sp] > t:
                    continue
                if op.base in INT_PIPE and int_free[sp] > t:
                    continue
                # issue
                if op.base == "MUFU":
                    mufu_free[sp] = t + MUFU_CYCLES
                if op.base in INT_PIPE:
                    int_free[sp] = t + INT_CYCLES
                done_at = t + LATENCY.get(op.base, DEFAULT_LATENCY)
                if op.tensor:
                    start = max(t, tensor_free)
                    tensor_free = start + op.tensor
                    if op.smem_bytes:   # its operands stream from shared memory alongside
                        smem_free = max(t, smem_free) + op.smem_bytes / SMEM_BYTES_PER_CYCLE
                        tensor_free = max(tensor_free, smem_free)
                    if op.base == "HGMMA":
                        w.mma_open = tensor_free + HGMMA_LATENCY
                        if "gsb0" in op.args:
                            w.mma_groups.append(w.mma_open)
                        done_at = t
                    else:
                        done_at = tensor_free + LATENCY["HMMA"]
                if op.smem_bytes and not op.tensor:
                    start = max(t, smem_free)
                    smem_free = start + op.smem_bytes / SMEM_BYTES_PER_CYCLE
                    done_at = max(done_at, smem_free + LATENCY.get(op.base, 30) - 1)
                if op.base == "LDGSTS":
                    w.cp_open = max(w.cp_open, t + LATENCY["LDGSTS"])
                if op.base == "LDGDEPBAR":
                    w.cp_groups.append(w.cp_open)
                if op.wbar < 6:
                    # a scoreboard counts every producer it is set by: the last one frees it
                    w.sb[op.wbar] = max(w.sb[op.wbar], done_at)
                if op.rbar < 6:
                    w.sb[op.rbar] = max(w.sb[op.rbar], t + READ_RELEASE)
                w.ready = t + max(op.stall, 1)
                _advance(w, op, t, n)
                break
        t += 1
        if t > 5e7:
            raise RuntimeError("simulation did not finish (a barrier that never releases?)")
    ends = [w.iter_end for w in warps]
    per_iter = max((e[iters - 1] - e[warmup - 1]) / (iters - warmup) for e in ends)
    return per_iter


def _advance(w, op, t, n):
    w.pc += 1
    if w.pc == n:
        w.pc = 0
        w.iter += 1
        w.iter_end.append(t)


@dataclass
class Simulated:
    """A compiled kernel's main loop, simulated on one SM with every CTA that fits."""
    func: object
    ops: list
    regs: int
    ctas_per_sm: int
    cycles_per_iter: float
    banks: dict = None         # loop_banks' summary


def simulate_cubin(cubin, name, shared, num_warps, inner_trips=1, lighter=False):
    """Disassemble kernel ``name`` of ``cubin`` (``shared``: its dynamic shared memory),
    find its main loop (``sass.main_loop``, ``lighter``) and simulate it with the CTAs its
    registers and memory allow."""
    func, hi = disassemble(cubin)[name]
    usage = sass.resource_usage(cubin)[name]
    occ = model.occupancy(usage["regs"], shared + usage["shared_static"], num_warps)
    waves, summary = loop_banks(cubin, func, num_warps, lighter)
    ops = body(func, hi, num_warps, inner_trips, waves, lighter)
    ctas = max(1, occ["ctas_per_sm"])
    return Simulated(func, ops, usage["regs"], ctas, simulate(ops, num_warps, ctas=ctas),
                     summary)


def simulate_grid(c, values, d, kind, block_m, block_n, num_warps, flop=1):
    """(Simulated, ``predict``'s dict) of compiled kernel ``c`` (``build.Compiled``)
    launched with ``values`` at feature dim ``d`` over N = M = ``build.N``: its inner D-loop
    run ceil(d / BLOCK_D) times per tile unless RESIDENT, and a backward beyond its
    resident D one program per dx slice, each streaming every other-side tile."""
    resident = values["RESIDENT"]
    trips = 1 if resident else -(-d // values["BLOCK_D"])
    slices = 1 if resident or kind == "fwd" else -(-d // values["BLOCK_DX"])
    sim = simulate_cubin(c.cubin, c.name, c.shared, num_warps, trips)
    return sim, predict(sim.cycles_per_iter, -(-build.M // block_n),
                        -(-build.N // block_m) * slices, sim.ctas_per_sm, flop)


def predict(cycles_per_iter, iters_per_cta, tiles, ctas_per_sm, flop):
    """Time and TFLOP/s of a grid of ``tiles`` CTAs, each ``iters_per_cta`` main-loop
    iterations, ``model.SMS * ctas_per_sm`` of them at once (the last wave partial):
    ``cycles_per_iter`` is one SM's, all its CTAs running. ``flop``: the useful FLOP."""
    waves = math.ceil(tiles / (model.SMS * ctas_per_sm))
    time = waves * iters_per_cta * cycles_per_iter / model.CLOCK_HZ
    tflops = flop / time / 1e12
    return {"waves": waves, "time_s": time, "tflops": tflops,
            "pct_bf16_peak": 100 * tflops / model.BF16_PEAK_TFLOPS}
