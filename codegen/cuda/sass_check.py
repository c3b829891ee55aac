"""A check of compiled wgmma kernels: no instruction writes a register that an unfinished
wgmma still reads as its A operand.

wgmma with A in registers (``HGMMA``/``IGMMA``/``QGMMA ... R<a>, gdesc[...]``) reads those
registers asynchronously, until a ``WARPGROUP.DEPBAR.LE gsb0, N`` retires its group. The PTX
rules make writing them earlier undefined, but at the PTX level the kernels never write an A
register at all: each stage's fragments are new virtual registers, and ptxas's allocator may
give them the physical registers of the group still in flight. It did so in the first
per-channel loop of ``wgmma_act8.cuh`` (the next stage's fragments landed on the in-flight
group's registers across the loop's back edge; the results were wrong on the GPU), and
nothing in ptxas's report says so. This module reads the SASS (``nvdisasm`` from NVIDIA's
``nvidia-cuda-nvdisasm`` wheel) and simulates the wgmma groups in program order, taking each
backward branch once, so a loop's body is seen after its own end.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GMMA = re.compile(r"^(?:@!?U?P\w+\s+)?[HIQ]GMMA\.\S+\s+R\d+,\s+R(\d+),\s+gdesc")
_DEPBAR = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s+0x([0-9a-f]+)")
_BRA = re.compile(r"^(?:@!?U?P\w+\s+)?BRA\b.*?\(?(\.L_x_\d+)\)?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_DEST = re.compile(r"^(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s+R(\d+)\b")


@dataclass
class Hazard:
    function: str
    address: int
    instruction: str
    register: int


def find_nvdisasm() -> str | None:
    """nvdisasm on PATH, next to nvcc, or from the nvidia-cuda-nvdisasm wheel."""
    from qcompiler.codegen.cuda.build import find_nvcc

    found = shutil.which("nvdisasm")
    if found:
        return found
    nvcc = find_nvcc()
    if nvcc and os.path.exists(os.path.join(os.path.dirname(nvcc), "nvdisasm")):
        return os.path.join(os.path.dirname(nvcc), "nvdisasm")
    try:
        import nvidia  # the namespace package of NVIDIA's wheels
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for sub in ("cu13", "cu12", "cuda_nvdisasm"):
            path = os.path.join(root, sub, "bin", "nvdisasm")
            if os.path.exists(path):
                return path
    return None


def _dest_registers(text: str) -> list[int]:
    """The general registers an instruction writes (its first operand), with the width its
    suffix implies; stores, branches and predicate-only results write none."""
    m = _DEST.match(text)
    if not m:
        return []
    op, first = m.group(1), int(m.group(2))
    if op.split(".")[0] in ("ST", "STS", "STG", "STL", "RED", "BRA", "BAR", "ISETP", "FSETP",
                            "SYNCS", "WARPGROUP", "HGMMA", "IGMMA", "QGMMA"):
        return []
    width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
    return list(range(first, first + width))


def check_functions(sass: str) -> list[Hazard]:
    """Hazards in every function of ``sass`` (``nvdisasm -c``'s text)."""
    hazards = []
    for name, body in re.findall(r"^\.text\.(\S+):\n(.*?)(?=^\s*\.section|\Z)", sass, re.S | re.M):
        code, labels = [], {}
        for line in body.splitlines():
            label = _LABEL.match(line.strip())
            if label:
                labels[label.group(1)] = len(code)
                continue
            m = _INSTR.search(line)
            if m:
                code.append((int(m.group(1), 16), m.group(2)))
        hazards += _check(name, code, labels)
    return hazards


def _check(name: str, code: list[tuple[int, str]], labels: dict) -> list[Hazard]:
    hazards, taken = [], set()
    in_flight: list[set] = []  # the A registers of each committed group, oldest first
    issued: set = set()        # those of the wgmmas issued since the last commit
    i, steps = 0, 0
    while i < len(code) and steps < 20 * len(code):
        steps += 1
        addr, text = code[i]
        g = _GMMA.match(text)
        if g:
            a = int(g.group(1))
            issued |= set(range(a, a + 4))
            if "gsb0" in text:  # the group's last wgmma: committed
                in_flight.append(issued)
                issued = set()
            i += 1
            continue
        d = _DEPBAR.search(text)
        if d:
            keep = int(d.group(1), 16)
            in_flight = in_flight[len(in_flight) - keep:] if keep else []
            i += 1
            continue
        busy = issued.union(*in_flight)
        for r in _dest_registers(text):
            if r in busy and not any(h.address == addr and h.register == r for h in hazards):
                hazards.append(Hazard(name, addr, text, r))
        b = _BRA.match(text)
        if b and b.group(1) in labels:
            target = labels[b.group(1)]
            if target <= i and i not in taken:
                taken.add(i)              # a loop's back edge: go round once more
                i = target
                continue
        i += 1
    return hazards


def check_cubin(path: str, nvdisasm: str | None = None) -> list[Hazard]:
    tool = nvdisasm or find_nvdisasm()
    if tool is None:
        raise FileNotFoundError("nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    sass = subprocess.run([tool, "-c", path], check=True, capture_output=True, text=True).stdout
    return check_functions(sass)
