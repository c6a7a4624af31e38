"""Read a cubin: resource usage, disassembly, the main loop and its instruction mix.

Resource usage comes from ``cuobjdump --dump-resource-usage`` (registers, local memory /
stack, static shared memory per function): ``CompiledKernel.n_regs`` would need the
binary loaded on a GPU. Spills are local memory: LOCAL / STACK bytes and every LDL / STL
in the code (for nvcc kernels ptxas' own "bytes spill stores" line is read too).

Finding the main loop (``main_loop``). ``nvdisasm -c`` prints each function's
instructions with their byte offsets and the labels branches jump to. Every ``BRA`` whose
target label sits at or before the branch is a back edge; it closes a loop that spans
the addresses [label, branch] (back edges to one label merge into one loop, a branch to
itself, the trap after EXIT, is no loop). Loops nest by containment. The main loop is the
outermost loop that holds the most tensor-core work (HGMMA / HMMA FLOP), ties broken by
size: in these kernels the loop over the streamed tiles. Loops inside it are inner
D-loops (the feature dimension in BLOCK_D chunks): each of their instructions is counted
``ceil(D / BLOCK_D)`` times per outer iteration, a nested one the product (the csrc
kernels' inner loops, chunk / k-step / tile-load loops, have their own counts:
``analyze.cuda_trips``). Everything in
the span is counted once per iteration, both sides of a forward branch included (the
in-loop branches of these kernels are uniform guards, e.g. an empty D-loop, that a full
tile takes or skips as a whole); predicated-off instructions still take their issue
slot, so they are counted. Triton software-pipelines the D-loop: its prologue loads
sit in the outer body and run once per tile, so they are counted once, as they run. A
check of the heuristic: ``tensor_flop_per_pair`` (from the HGMMA / HMMA shapes found)
against the FLOP the kernel's dots must do, reported as ``tensor_flop_ratio``.

Per-pair counts: an instruction in the SASS runs once per warp, so one occurrence per
iteration is ``32 * num_warps`` thread-operations for ``BLOCK_M * BLOCK_N`` pairs:
count per pair = occurrences * weight * 32 * num_warps / (BLOCK_M * BLOCK_N). HGMMA
is one warpgroup instruction seen by its 4 warps: its FLOP are
2 m n k * num_warps / 4 per occurrence; HMMA (mma.sync) is per warp: 2 m n k * num_warps.
"""
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field

from . import build

INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):\s*$")
FUNC = re.compile(r"^\s*\.text\.(\S+):\s*$")
TARGET = re.compile(r"`\(([^)]+)\)")

# -------------------------------------------------------------------- resource usage


def resource_usage(cubin):
    """{function: {"regs", "stack", "shared_static", "local"}} from cuobjdump."""
    out = subprocess.run([build.tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                         capture_output=True, text=True, check=True).stdout
    res, fn = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn:
            res[fn] = dict(regs=int(m.group(1)), stack=int(m.group(2)),
                           shared_static=int(m.group(3)), local=int(m.group(4)))
            fn = None
    return res


def ptxas_spills(log):
    """{mangled function: (spill store bytes, spill load bytes)} from an ``-Xptxas -v`` log."""
    out, fn = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or \
            re.search(r"Function properties for (\S+)", line)
        if m:
            fn = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn:
            out[fn] = (int(m.group(1)), int(m.group(2)))
    return out

# ---------------------------------------------------------------------- disassembly


@dataclass
class Instr:
    addr: int
    pred: str
    op: str         # full opcode with modifiers, e.g. HGMMA.64x64x16.F32.BF16
    args: str

    @property
    def base(self):
        return self.op.split(".")[0]


@dataclass
class Function:
    name: str
    instrs: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)   # label -> address


def disassemble(cubin):
    """{function name: Function} from ``nvdisasm -c``."""
    text = subprocess.run([build.tool("nvdisasm"), "-c", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    funcs, cur, pending = {}, None, []
    for line in text.splitlines():
        m = FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), Function(m.group(1)))
            pending = []
            continue
        if cur is None:
            continue
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = INSTR.match(line)
        if m:
            ins = Instr(int(m.group(1), 16), m.group(2) or "", m.group(3), m.group(4).strip())
            for lab in pending:
                cur.labels[lab] = ins.addr
            pending = []
            cur.instrs.append(ins)
    return funcs


@dataclass
class Loop:
    start: int
    end: int        # address of the (last) back-edge branch
    children: list = field(default_factory=list)

    def contains(self, other):
        return self.start <= other.start and other.end <= self.end and self != other


def loops(func):
    """The loops of ``func`` (back edges merged per header), outermost first, nested."""
    ends = {}
    for ins in func.instrs:
        if ins.base != "BRA":
            continue
        m = TARGET.search(ins.args)
        if not m or m.group(1) not in func.labels:
            continue
        tgt = func.labels[m.group(1)]
        if tgt < ins.addr:          # tgt == addr: the trap loop after EXIT
            ends[tgt] = max(ends.get(tgt, tgt), ins.addr)
    found = sorted((Loop(s, e) for s, e in ends.items()), key=lambda lp: (lp.start, -lp.end))
    top = []
    for lp in found:
        parent = None
        stack = list(top)
        while stack:
            cand = stack.pop()
            if cand.contains(lp):
                parent = cand
                stack = list(cand.children)
        (parent.children if parent else top).append(lp)
    return top

# ------------------------------------------------------------------ classification


def mma_flop(ins, num_warps):
    """FLOP per CTA of one occurrence of a tensor-core instruction, and its input type."""
    parts = ins.op.split(".")
    if parts[0] == "HGMMA":
        m, n, k = (int(x) for x in parts[1].split("x"))
        ty = next((p for p in parts[2:] if p in ("BF16", "F16", "TF32", "E4M3", "E5M2", "S8")), "F16")
        if parts[2:3] == ["F16"] and len(parts) == 3:
            ty = "F16"
        return 2 * m * n * k * num_warps / 4, ty, f"{m}x{n}x{k}.{ty}"
    if parts[0] == "HMMA":
        shape = parts[1]
        m, n, k = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4),
                   "1684": (16, 8, 4)}.get(shape, (16, 8, 16))
        ty = next((p for p in parts[2:] if p in ("BF16", "TF32")), "F16")
        return 2 * m * n * k * num_warps, ty, f"{m}x{n}x{k}.{ty}"
    return 0.0, None, None


FP32_ALU = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP")
INT_ALU = ("IMAD", "IADD3", "IADD", "VIADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP",
           "SEL", "IABS", "PRMT", "SGXT", "IMNMX", "VIMNMX", "P2R", "R2P", "PLOP3", "POPC", "FLO",
           "BMSK", "BREV", "IDP", "IMUL", "ICMP", "LEA.HI")
CONVERT = ("F2F", "F2FP", "F2I", "I2F", "I2FP", "F2IP", "FRND", "HADD2", "HMUL2", "HFMA2",
           "HSETP2", "HMNMX2")
MOVE = ("MOV", "S2R", "CS2R", "S2UR", "R2UR", "SHFL", "LDC", "ULDC", "VOTE", "VOTEU", "MOVM")
SYNC = ("BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "WARPSYNC", "SYNCS", "FENCE", "MEMBAR",
        "ARRIVES", "ERRBAR", "CCTL", "NANOSLEEP", "ELECT")
CONTROL = ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "BRX", "JMP", "YIELD", "BPT", "KILL")
MEMORY = ("LDG", "LDGSTS", "UTMALDG", "UTMASTG", "UBLKCP", "LDS", "STS", "LDSM", "STSM", "STG",
          "LDL", "STL", "LD", "ST", "ATOM", "ATOMG", "ATOMS", "RED", "REDG")

# the per-pair columns of the report, each a set of base opcodes (plus MUFU split below)
COLUMNS = {
    "hgmma": ("HGMMA",), "hmma": ("HMMA",),
    "fp32_mul_add_fma": ("FFMA", "FMUL", "FADD"), "fp32_sel_setp": ("FSEL", "FSETP"),
    "fp32_mnmx": ("FMNMX",), "int_addr": INT_ALU, "convert": CONVERT,
    "ldg": ("LDG",), "ldgsts": ("LDGSTS",), "utmaldg": ("UTMALDG",), "lds": ("LDS",),
    "sts": ("STS",), "ldsm": ("LDSM",), "shfl": ("SHFL",), "bar": ("BAR",),
    "ldl_stl": ("LDL", "STL"),
}


def classify(ins):
    """Coarse class of an instruction (for the 'other' bucket of the JSON)."""
    b = ins.base
    if b in ("HGMMA", "HMMA", "IMMA", "QGMMA"):
        return "tensor"
    if b == "MUFU":
        return "mufu"
    if b in FP32_ALU:
        return "fp32"
    if b.startswith("U"):
        return "uniform"
    for name, group in (("int", INT_ALU), ("convert", CONVERT), ("move", MOVE), ("sync", SYNC),
                        ("control", CONTROL), ("memory", MEMORY)):
        if b in group:
            return name
    return "other"


def _weights(func, main, trips):
    """{address: times it runs per main-loop iteration} for the instructions of ``main``.

    ``trips(loop, index, parent)`` gives the trip count of an inner loop per run of its
    parent (``index``: its rank among the parent's inner loops); an int is the same for all.
    """
    trip = trips if callable(trips) else (lambda lp, i, parent: trips)

    def visit(lp, w, out):
        for i, child in enumerate(lp.children):
            visit(child, w * trip(child, i, lp), out)
        for ins in func.instrs:
            if lp.start <= ins.addr <= lp.end and ins.addr not in out:
                out[ins.addr] = w
        return out
    # children first, so that an instruction takes the weight of its innermost loop
    return visit(main, 1, {})


def loop_ops(func, lp):
    """Counter of the base opcodes in the span of ``lp`` (inner loops included, once)."""
    return Counter(i.base for i in func.instrs if lp.start <= i.addr <= lp.end)


def main_loop(func, num_warps, lighter=False):
    """The main loop of ``func`` (see the module docstring), or None without any loop.
    ``lighter``: of the loops with the most MMA work, the one with the fewest
    instructions (a kernel that streams a few tiles through a heavier copy of its loop
    first, and most through this one)."""
    top = loops(func)
    if not top:
        return None

    def score(lp):
        flop = sum(mma_flop(i, num_warps)[0] for i in func.instrs if lp.start <= i.addr <= lp.end)
        n = sum(1 for i in func.instrs if lp.start <= i.addr <= lp.end)
        return flop, -n if lighter else n
    return max(top, key=score)


@dataclass
class LoopMix:
    """Instruction mix of one main-loop iteration, per query-reference pair."""
    per_pair: dict          # column -> thread-ops per pair (see COLUMNS, plus mufu_*, all)
    classes: dict           # coarse class -> thread-ops per pair
    shapes: dict            # tensor instruction shape -> occurrences per iteration
    tensor_flop_per_pair: dict   # input type -> FLOP per pair
    loop_instrs: int        # instructions in the span (static)
    inner_loops: int
    inner_trips: object     # int, or "per loop"
    spill_instrs: int       # LDL / STL anywhere in the function
    opcodes: dict = field(default_factory=dict)   # base opcode -> per pair


def loop_mix(func, num_warps, pairs, inner_trips):
    """Count the main loop of ``func`` per pair; ``pairs`` = BLOCK_M * BLOCK_N.

    ``inner_trips``: trip count of the inner loops, an int (Triton: ceil(D / BLOCK_D)) or
    a callable as in ``_weights`` (the csrc kernels, whose inner loops differ).
    """
    main = main_loop(func, num_warps)
    spills = sum(1 for i in func.instrs if i.base in ("LDL", "STL"))
    if main is None:
        return None
    weights = _weights(func, main, inner_trips)
    thread = 32 * num_warps / pairs
    ops, shapes, tflop = Counter(), Counter(), Counter()
    mufu = Counter()
    for ins in func.instrs:
        w = weights.get(ins.addr)
        if w is None or ins.base == "NOP":
            continue
        ops[ins.base] += w
        if ins.base == "MUFU":
            mufu[ins.op.split(".")[1] if "." in ins.op else "?"] += w
        flop, ty, shape = mma_flop(ins, num_warps)
        if shape:
            shapes[ins.base + "." + shape] += w
            tflop[ty] += flop * w / pairs
    per_pair = {col: thread * sum(ops[b] for b in group) for col, group in COLUMNS.items()}
    per_pair["mufu_ex2"] = thread * mufu.get("EX2", 0)
    per_pair["mufu_other"] = thread * (sum(mufu.values()) - mufu.get("EX2", 0))
    per_pair["all"] = thread * sum(ops.values())
    classes = Counter()
    for ins in func.instrs:
        w = weights.get(ins.addr)
        if w is not None and ins.base != "NOP":
            classes[classify(ins)] += w * thread
    n_inner = 0
    stack = list(main.children)
    while stack:
        lp = stack.pop()
        n_inner += 1
        stack += lp.children
    trips = (inner_trips if isinstance(inner_trips, int) else "per loop") if n_inner else 1
    return LoopMix(per_pair=per_pair, classes=dict(classes), shapes=dict(shapes),
                   tensor_flop_per_pair=dict(tflop),
                   loop_instrs=sum(1 for i in func.instrs if main.start <= i.addr <= main.end),
                   inner_loops=n_inner, inner_trips=trips,
                   spill_instrs=spills,
                   opcodes={k: thread * v for k, v in sorted(ops.items(), key=lambda kv: -kv[1])})
