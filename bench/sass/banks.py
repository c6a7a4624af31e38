"""Shared-memory bank conflicts of a Triton kernel's main loop, from its PTX.

*Predicted from compiled code*, never measured. The SASS says how wide each shared-memory
access is, not which addresses its 32 lanes touch; the PTX triton wrote before ptxas
does, as a chain of integer operations from ``%tid.x`` (LLVM's registers are defined
once, outside loops). For each ``ld.shared`` / ``st.shared`` / ``ldmatrix`` /
``stmatrix`` of the loop, this evaluates the address of every thread of the CTA and
counts the wavefronts one warp instruction needs: shared memory has 32 banks of 4 bytes
and serves one wavefront per cycle (128 bytes without conflicts); lanes that touch
distinct words of one bank are served one per wavefront within a phase of the access
(``wavefronts``), lanes that read one word share it (an ``ldmatrix`` lane gives one
16-byte matrix row), and the data returned takes a wavefront per 128 bytes.

What the evaluation assumes: a value the warp shares but the PTX does not fix (the
block index, a kernel parameter, a loop-carried stage offset) is taken as 0, which moves
every lane of an access alike; a register defined more than once (a loop's phi, lowered
to ``mov``) takes its first definition, the loop's entry value, unless one of its
definitions loads from memory (or is a vector's part): that makes the access unknown, and
an unknown access costs what its width gives, no conflict. Predicated accesses count
every lane.

Matching to the SASS (``for_loop``): ptxas keeps a shared-memory access's width and
immediate offset (``[%r390+98304]`` in the PTX is ``[R160+UR4+0x18000]`` in the SASS),
so the loop's SASS accesses take the PTX accesses of the same kind, width, lanes and
offset in order, where both hold as many of them; an access left over takes the count its
group of leftovers agrees on, or none (its width's cost).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

_LINE = re.compile(r"^\s*(@!?%p\d+\s+)?([a-z][\w.:]*)\s+(.*?);\s*(//.*)?$")
_LABEL = re.compile(r"^\s*(\$L__\w+):\s*(//.*)?$")
_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")
_ADDR = re.compile(r"\[\s*([%\w$]+)?\s*(?:\+\s*(-?(?:0x[0-9a-fA-F]+|\d+)))?\s*\]")
_SHARED = ("ld.shared", "st.shared", "ldmatrix", "stmatrix")
# definitions whose value comes from memory or another lane: an address from them is unknown
_LOADED = ("ld", "ldu", "atom", "shfl", "tex", "vote", "redux", "activemask", "cp")
_MASK32 = (1 << 32) - 1


class _Unknown(Exception):
    """An address that depends on a value loaded from memory."""


def ptx_path(cubin):
    """The PTX beside ``cubin`` (``build.compile_triton`` writes ``<stem>.ptx``; a compile
    at an older commit writes ``<sha1 of the cubin, 12 hex>.ptx``), or None."""
    cubin = Path(cubin)
    for p in (cubin.with_suffix(".ptx"),
              cubin.parent / f"{hashlib.sha1(cubin.read_bytes()).hexdigest()[:12]}.ptx"):
        if p.exists():
            return p
    return None


def _operands(text):
    """Top-level comma-separated operands (braces and brackets kept whole)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


class Ptx:
    """One kernel's PTX: its instructions, each register's definitions (in order), its
    loops."""

    def __init__(self, text):
        self.instrs, self.labels, self.defs = [], {}, {}
        for line in text.splitlines():
            m = _LABEL.match(line)
            if m:
                self.labels[m.group(1)] = len(self.instrs)
                continue
            m = _LINE.match(line)
            if not m or m.group(2).startswith("."):
                continue
            op, ops = m.group(2), _operands(m.group(3))
            self.instrs.append((op, ops, line))
            if ops and ops[0][:1] in "%{" and not op.startswith(("st.", "stmatrix")):
                # "%p1|%p2" (setp's two outputs), "{%r1, %r2}" (a vector load's)
                for reg in re.split(r"[|,{}\s]+", ops[0]):
                    if reg:
                        self.defs.setdefault(reg, []).append(len(self.instrs) - 1)

    def loops(self):
        """[(first, last) instruction index] of every backward branch's span."""
        out = []
        for i, (_, _, line) in enumerate(self.instrs):
            m = _BRA.search(line)
            if m and self.labels.get(m.group(1), i + 1) <= i:
                out.append((self.labels[m.group(1)], i))
        return out


def _imm(tok):
    tok = tok.strip()
    if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok):
        return int(tok, 0)
    if re.fullmatch(r"0[dDfF][0-9a-fA-F]+", tok):
        raise _Unknown(tok)                    # a float: no address
    return None


def _s32(x):
    """``x`` as the signed 32-bit value its low 32 bits hold (registers are kept so:
    negative immediates and .s32 comparisons agree; addresses are small and positive)."""
    return ((x + (1 << 31)) & _MASK32) - (1 << 31)


def _u32(x, op):
    """``x`` as an unsigned 32-bit operand where ``op`` reads its operands unsigned."""
    return x & _MASK32 if any(t in op.split(".") for t in ("u32", "b32")) else x


class Lanes:
    """Values of the PTX registers for every thread ``tid`` of a CTA (numpy int64)."""

    def __init__(self, ptx, threads):
        self.ptx, self.tid = ptx, np.arange(threads, dtype=np.int64)
        self.memo, self.assumed = {}, set()

    def value(self, tok):
        tok = tok.strip()
        imm = _imm(tok)
        if imm is not None:
            return np.full_like(self.tid, imm)
        if tok in ("%tid.x", "%tid"):
            return self.tid.copy()
        if tok == "%laneid":
            return self.tid % 32
        if tok.startswith("{"):
            raise _Unknown(tok)                # a packed vector
        if tok.startswith(("%tid.", "%ntid", "%ctaid", "%nctaid", "%clusterid",
                           "%cluster_ctaid")) or not tok.startswith("%"):
            self.assumed.add(tok)              # a symbol (global_smem) or a block index
            return np.zeros_like(self.tid)
        if tok not in self.memo:
            self.memo[tok] = self._define(tok)
        return self.memo[tok]

    def _define(self, reg):
        found = self.ptx.defs.get(reg)
        if not found:
            self.assumed.add(reg)
            return np.zeros_like(self.tid)
        for i in found:        # a value loaded from memory (one definition of several)
            op, ops, _ = self.ptx.instrs[i]
            if op.split(".")[0] in _LOADED and not op.startswith("ld.param"):
                raise _Unknown(reg)
            if ops[0].startswith("{") or "|" in ops[0] and ops[0].split("|")[1].strip() == reg:
                raise _Unknown(reg)    # a vector's part, setp's second (negated) output
        op, ops, _ = self.ptx.instrs[found[0]]   # the first: a loop's entry value
        if op.startswith("ld.param"):
            self.assumed.add(reg)
            return np.zeros_like(self.tid)
        base = op.split(".")[0]
        v = [self.value(o) for o in ops[1:]] if base != "selp" else None
        out = _apply(base, op, v, ops, self)
        wide = any(t in op.split(".") for t in ("b64", "u64", "s64", "wide"))
        if base == "cvt":       # cvt.<to>.<from>: the destination type decides
            wide = op.split(".")[1] in ("b64", "u64", "s64")
        return out if wide else _s32(out)


def _apply(base, op, v, ops, lanes):
    if base in ("mov", "cvt", "cvta"):
        return v[0]
    if base == "add":
        return v[0] + v[1]
    if base == "sub":
        return v[0] - v[1]
    if base == "mul":
        if ".hi" in op:
            return (_u32(v[0], op) * _u32(v[1], op)) >> 32
        return v[0] * v[1]
    if base in ("div", "rem"):
        a, b = _u32(v[0], op), _u32(v[1], op)
        if (b == 0).any():
            raise _Unknown(op)
        q = np.trunc(a / b).astype(np.int64)     # PTX divides toward zero
        return q if base == "div" else a - q * b
    if base == "mad":
        return v[0] * v[1] + v[2]
    if base == "shl":
        return v[0] << v[1]
    if base == "shr":      # .s: arithmetic (registers hold signed values), else logical
        return (v[0] if ".s" in op else _u32(v[0], op) if ".b64" not in op and
                ".u64" not in op else v[0] & ((1 << 64) - 1)) >> v[1]
    if base == "and":
        return v[0] & v[1]
    if base == "or":
        return v[0] | v[1]
    if base == "xor":
        return v[0] ^ v[1]
    if base == "not":
        return ~v[0]
    if base == "neg":
        return -v[0]
    if base in ("min", "max"):
        a, b = _u32(v[0], op), _u32(v[1], op)
        return (np.minimum if base == "min" else np.maximum)(a, b)
    if base == "bfe":
        return (v[0] >> v[1]) & ((1 << v[2]) - 1)
    if base == "bfi":          # bfi d, a, b, pos, len: a's low bits into b at pos
        mask = ((1 << v[3]) - 1) << v[2]
        return (v[1] & ~mask) | ((v[0] << v[2]) & mask)
    if base == "lop3":
        a, b, c, lut = v[0], v[1], v[2], int(v[3][0])
        out = np.zeros_like(a)
        for bit in range(8):
            if lut >> bit & 1:
                out |= (a if bit & 4 else ~a) & (b if bit & 2 else ~b) & (c if bit & 1 else ~c)
        return out
    if base == "selp":
        p = lanes.value(ops[3]).astype(bool)
        return np.where(p, lanes.value(ops[1]), lanes.value(ops[2]))
    if base == "setp":
        if len(v) > 2:       # setp.<cmp>.<and|or>.<type> p, a, b, c: not evaluated
            raise _Unknown(op)
        cmp = op.split(".")[1]
        unsigned = cmp in ("lo", "ls", "hi", "hs") or any(
            t in op.split(".") for t in ("u32", "b32"))
        a, b = (_u32(v[0], ".u32"), _u32(v[1], ".u32")) if unsigned and ".u64" not in op \
            else (v[0], v[1])
        return {"eq": a == b, "ne": a != b, "lt": a < b, "le": a <= b, "gt": a > b,
                "ge": a >= b, "lo": a < b, "ls": a <= b, "hi": a > b,
                "hs": a >= b}[cmp].astype(np.int64)
    raise _Unknown(op)


def _width(op, ops):
    """(bytes per lane, lanes that give an address) of a shared-memory access."""
    if op.startswith(("ldmatrix", "stmatrix")):
        n = int(re.search(r"\.x(\d)", op).group(1))
        return 16, 8 * n
    size = next((int(p[1:]) // 8 for p in op.split(".") if re.fullmatch(r"[bfsu]\d+", p)), 4)
    vec = next((int(p[1:]) for p in op.split(".") if re.fullmatch(r"v\d", p)), 1)
    return size * vec, 32


def wavefronts(addr, width, lanes=32):
    """Wavefronts one warp's access takes: ``addr`` the byte address of each of its
    ``lanes`` lanes, ``width`` bytes each. Shared memory serves a 4-byte access in one
    phase of 32 lanes, an 8-byte one in two of 16, a 16-byte one (and ``ldmatrix``, a
    16-byte matrix row per lane) in four of 8; within a phase, distinct words of one bank
    take a wavefront each. And it returns 128 bytes a cycle: never fewer than
    lanes x width / 128, however many lanes share a word."""
    per_phase = 32 if width <= 4 else 16 if width == 8 else 8
    words = max(1, width // 4)
    total = 0
    for start in range(0, lanes, per_phase):
        touched = {int(a) // 4 + k for a in addr[start:min(lanes, start + per_phase)]
                   for k in range(words)}
        total += max(Counter(w % 32 for w in touched).values())
    return max(total, -(-lanes * width // 128))


def accesses(ptx, lo, hi, num_warps):
    """[(kind, width, lanes, offset, wavefronts per warp instruction or None)] of the
    shared-memory accesses between instructions ``lo`` and ``hi``; kind "LDS", "STS",
    "LDSM" or "STSM", ``lanes`` the lanes that give an address."""
    lanes = Lanes(ptx, 32 * num_warps)
    out = []
    for op, ops, _ in ptx.instrs[lo:hi + 1]:
        if not op.startswith(_SHARED):
            continue
        kind = {"ld": "LDS", "st": "STS", "ldmatrix": "LDSM", "stmatrix": "STSM"}[
            op.split(".")[0]]
        try:
            addr_tok = next(o for o in ops if o.startswith("["))
            m = _ADDR.fullmatch(addr_tok)
            reg, off = (m.group(1), int(m.group(2) or "0", 0)) if m else (None, 0)
            width, nlanes = _width(op, ops)
        except (StopIteration, AttributeError, ValueError):
            continue
        try:
            base = lanes.value(reg) if reg else np.zeros_like(lanes.tid)
            addr = (base + off).reshape(num_warps, 32)
            waves = float(np.mean([wavefronts(a, width, nlanes) for a in addr]))
        except (_Unknown, KeyError, ValueError, IndexError, RecursionError, OverflowError):
            waves = None
        out.append((kind, width, nlanes, off, waves))
    return out


def _sass_key(ins):
    """(kind, width, lanes, immediate offset) of a SASS LDS / STS / LDSM / STSM, or None."""
    if ins.base not in ("LDS", "STS", "LDSM", "STSM"):
        return None
    parts = ins.op.split(".")
    lanes = 32
    if ins.base in ("LDSM", "STSM"):
        width = 16      # LDSM.16.M88.4: a 16-byte row per lane, 8 lanes per matrix
        lanes = 8 * next((int(p) for p in parts[2:] if p in ("1", "2", "4")), 4)
    else:
        width = next((int(p.lstrip("US")) // 8 for p in parts[1:]
                      if p.lstrip("US") in ("8", "16", "32", "64", "128")), 4)
    m = re.search(r"\[([^\]]*)\]", ins.args)
    off = 0
    if m:
        imm = re.search(r"(?:^|\+)\s*(-?0x[0-9a-f]+|-?\d+)\s*$", m.group(1))
        off = int(imm.group(1), 0) if imm else 0
    return ins.base, width, lanes, off


def for_loop(cubin, instrs, num_warps):
    """{SASS address: wavefronts per warp instruction} for the shared-memory accesses among
    ``instrs`` (one main loop's SASS) whose PTX twin was found, and a summary dict.

    A SASS access takes the PTX access of its kind, width, lanes and immediate offset in
    order where the SASS and the PTX loop hold as many of that key (ptxas may fold an
    address's constant into the offset, which makes the counts differ); the others take
    the wavefronts their group (kind, width, lanes) of unmatched PTX accesses agrees on,
    if it agrees, and otherwise none (counted as their width gives)."""
    path = ptx_path(cubin)
    keys = [(ins.addr, _sass_key(ins)) for ins in instrs]
    keys = [(a, k) for a, k in keys if k is not None]
    summary = dict(ptx=bool(path), sass_accesses=len(keys), matched=0, conflicted=0)
    if path is None or not keys:
        return {}, summary
    ptx = Ptx(path.read_text())
    want = Counter(k for _, k in keys)
    best, best_score = [], -1
    for lo, hi in ptx.loops():   # the PTX loop whose accesses look most like the SASS loop's
        acc = accesses(ptx, lo, hi, num_warps)
        score = sum((Counter(a[:4] for a in acc) & want).values())
        if score > best_score:
            best, best_score = acc, score
    have = Counter(a[:4] for a in best)
    exact, loose = defaultdict(list), defaultdict(list)
    for a in best:
        (exact[a[:4]] if have[a[:4]] == want[a[:4]] else loose[a[:3]]).append(a[4])
    out = {}
    for addr, k in keys:
        if exact[k]:
            out[addr] = exact[k].pop(0)
        elif len(set(loose[k[:3]])) == 1:
            out[addr] = loose[k[:3]][0]
    out = {a: w for a, w in out.items() if w is not None}
    summary.update(matched=len(out), conflicted=sum(
        1 for a, k in keys if a in out and out[a] > _ideal(k[1], k[2])))
    return out, summary


def _ideal(width, lanes=32):
    """Wavefronts of a conflict-free warp access: ``lanes`` lanes of ``width`` bytes."""
    return max(1, lanes * width // 128)
