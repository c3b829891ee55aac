"""Tensor-parallel modules (``passes/shard.py``) rank by rank.

A sharded module is the global view: nodes with a ``rank`` attribute run on that rank, the
others on every rank, and ``all_reduce`` lists one partial per rank. ``rank_program`` is what
one process of a tensor-parallel runtime runs: its own nodes and the replicated ones, its
weights only, and each ``all_reduce`` with its own partial and ``world = N`` (the collective
sums it with the other processes': ``qcompiler.runtime.collectives``). ``run_ranks``
simulates that runtime on the CPU reference: one thread per rank, each running its rank
program, the all_reduce a barrier-synchronized sum in rank order.
It checks what a multi-GPU run would compute, on a machine with none.
"""
from __future__ import annotations

import threading

import numpy as np

from qcompiler.errors import InputError
from qcompiler.ir import Module
from qcompiler.ir.verifier import PLACEMENT_ATTR


def ranks_of(module: Module) -> int:
    """The tensor-parallel degree of a sharded module (1: not sharded)."""
    degree = 1
    for n in module.main.nodes:
        if n.op == "all_reduce":
            degree = max(degree, len(n.operands), n.attrs.get("world", 1))
        if PLACEMENT_ATTR in n.attrs:
            degree = max(degree, n.attrs[PLACEMENT_ATTR] + 1)
    return degree


def rank_program(module: Module, rank: int) -> Module:
    """Rank ``rank``'s program: its nodes and the replicated ones, each all_reduce with the
    rank's own partial only; other ranks' nodes and weights are gone."""
    tp = ranks_of(module)
    if not 0 <= rank < tp:
        raise InputError(f"rank {rank} is not one of the module's {tp} ranks")
    m = module.clone()
    fn = m.main
    kept = []
    for n in fn.nodes:
        placed = n.attrs.get(PLACEMENT_ATTR)
        if placed is not None and placed != rank:
            continue
        if n.op == "all_reduce":
            if len(n.operands) != tp:
                raise InputError(f"%{n.results[0].name}: all_reduce has {len(n.operands)} "
                                 f"partials for {tp} ranks")
            n.operands = [n.operands[rank]]
            n.attrs = {**n.attrs, "world": tp}  # the other partials come from the collective
        kept.append(n)
    fn.nodes = kept
    fn.remove_dead_nodes()
    used = {n.attrs["name"] for n in fn.nodes if n.op == "constant" and "name" in n.attrs}
    m.constants = {k: v for k, v in m.constants.items() if k in used}
    return m


def run_ranks(module: Module, inputs: dict, timeout_s: float = 60.0) -> list[dict]:
    """Each rank's outputs (a list by rank) from its rank program, the ranks in threads and
    every all_reduce summed across them (rank order, the operands' type)."""
    from qcompiler.runtime import reference

    tp = ranks_of(module)
    programs = [rank_program(module, r) for r in range(tp)]
    barrier = threading.Barrier(tp, timeout=timeout_s)
    slots: dict = {}  # all_reduce result name -> [partial of each rank]
    lock = threading.Lock()

    def all_reduce(rank):
        def impl(node, args, _module):
            name = node.results[0].name
            with lock:
                slots.setdefault(name, [None] * tp)[rank] = args[0]
            barrier.wait()  # every rank's partial is in
            total = slots[name][0].copy()
            for part in slots[name][1:]:
                total = total + part
            barrier.wait()  # every rank has read them
            return [total.astype(args[0].dtype)]
        return impl

    results: list = [None] * tp
    errors: list = []

    def worker(rank):
        try:
            prog = programs[rank]
            kernels = {n.results[0].name: all_reduce(rank) for n in prog.main.nodes
                       if n.op == "all_reduce"}
            results[rank] = reference.run(prog, inputs, kernels=kernels)
        except Exception as e:  # noqa: BLE001 - reported below with the rank
            errors.append((rank, e))
            barrier.abort()  # the other ranks must not wait for this one

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, e = min(errors, key=lambda re: isinstance(re[1], threading.BrokenBarrierError))
        raise RuntimeError(f"rank {rank}: {type(e).__name__}: {e}") from e
    return results


__all__ = ["ranks_of", "rank_program", "run_ranks"]
