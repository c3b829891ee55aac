"""cpu-schedule: choose the CPU kernel of every qmatmul: numerics, tile and per-batch variants.

Options: ``target`` (a cpu target, default ``cpu`` = the host), ``numerics`` (``auto``, the
default: what each qmatmul's model allows; for an ``accuracy_level`` of 4 (MatMulNBits
accuracy_level 4, which onnxruntime computes with int8 activations) ``lut`` for a one-row
layer of 1- or 2-bit codes on x86 (``LUT_AUTO_MAX_BITS``), else ``int8`` where the target has
an int8 kernel for it; otherwise ``exact``; ``exact``: fp32 activations like MatMulNBits
accuracy_level 0; ``int8``: activations quantized at run time per row and group to symmetric
int8 and int8 dot products, like accuracy_level 4: ``vpdpbusd`` on AVX-512 VNNI targets,
``vpmaddubsw`` + ``vpmaddwd`` on the other x86 ones, ``sdot`` on cpu-arm-dotprod (refused on
cpu-arm-neon), chosen from the target's ISA features; ``lut``: T-MAC-style table lookups for
1- to 4-bit codes, ``vpermb`` (AVX-512 VBMI) or ``vpshufb`` (Arm: ``tbl``) on tables of
activation sums quantized to int8 per row and group, the accuracy of int8 activations; see
``codegen/cpu/kernels.py``), ``tuning_log`` (a JSON Lines tuning log; empty: the heuristic
of ``codegen/cpu/tuning.py``; with ``numerics=auto`` the log also chooses between ``int8``
and ``lut`` for an accuracy_level-4 qmatmul where it measured both, ``logged_numerics``).

A lut qmatmul's config also says which lookup its kernel uses (``byte_permute``: 1 for
``vpermb`` on AVX-512 VBMI targets while the model's quantized weights fit in the host's
last-level cache, 0 for ``vpshufb`` where they outgrow it and a decode step streams them from
memory: ``tuning.lut_byte_permute``, measured on a Zen 4).

Each qmatmul's ``config`` gets ``impl = "tvm"``, ``numerics``, ``n_tile``, ``lanes`` and
``variants``: one kernel variant per batch-size range, chosen for a representative M (the
static M if the batch is static, else 1, 16 and 128 for M = 1, 2..16 and larger), each with its
knobs and ``source`` (``heuristic`` or ``tuning-log``); the node's ``source`` says whether any
came from the log; ``w_scheme`` is the model's scheme (also after cpu-pack-weights, which
changes only the weight's element type and layout). A qmatmul the kernels cannot compute
(integer activations, nf4/float codes, groups along N, per-row scales, float zero points,
non-f32 activations, non-constant weights, act-order with unequal groups) gets
``impl = "reference"`` and the reason, with a warning: the numpy reference runs it, and the
manifest says so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from qcompiler.codegen.cpu.tuning import node_key
from qcompiler.ir import Module
from qcompiler.ir.core import constant_value
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass

# (representative M, largest M served; 0 = unbounded) of the variants of a symbolic batch.
SYMBOLIC_BUCKETS = ((1, 1), (16, 16), (128, 0))
# The M values keys are looked up at (read by the tuner: each M maps to the smallest bucket
# that holds it, the largest serves every larger M).
M_BUCKETS = tuple(m for m, _ in SYMBOLIC_BUCKETS)


def model_weight_bytes(module: Module) -> int:
    """The bytes of every qmatmul's codes at their bits (K x N x bits / 8): what a decode
    step reads."""
    total = 0
    for node in module.main.nodes:
        if node.op == "qmatmul":
            k = node.operands[0].type.shape[-1]
            n = node.results[0].type.shape[-1]
            if isinstance(k, int) and isinstance(n, int):
                total += k * n * node.attrs["w_scheme"].bits // 8
    return total


def batch_rows(node):
    """The static number of rows of x (product of its leading dims), or None if symbolic."""
    lead = node.operands[0].type.shape[:-1]
    if all(isinstance(d, int) for d in lead):
        return int(np.prod(lead, dtype=np.int64)) if lead else 1
    return None


def unsupported_reason(module: Module, node, target, numerics_mode: str):
    """Why the CPU kernels cannot compute ``node`` (None if they can)."""
    from qcompiler.codegen.cpu import layout, tuning

    if node.arg("w").type.layout is not None:
        return f"weights already in layout {node.arg('w').type.layout}"
    if node.attrs.get("x_norm"):
        return (f"x_norm={node.attrs['x_norm']} (fuse-norm-qmatmul): the CPU kernels take x "
                f"as it is; leave the rmsnorm its own op (drop the pass)")
    for name, what in (("w", "weight codes"), ("w_scale", "scales"),
                       ("w_zero_point", "zero points"), ("g_idx", "g_idx")):
        v = node.arg(name)
        if v is not None and constant_value(module, v) is None:
            return f"the {what} are not a constant"
    k = node.operands[0].type.shape[-1]
    n = node.results[0].type.shape[-1]
    if not isinstance(k, int) or not isinstance(n, int):
        return f"K={k} and N={n} must be static"
    try:
        p = tuning.problem(target, node_key(node, 1, numerics_mode))
        if p.scheme.act_order:
            layout.act_order_permutation(constant_value(module, node.arg("g_idx")),
                                         p.blocking.block, p.k)
        _, zc = layout.group_params(p.scheme, constant_value(module, node.arg("w_scale")),
                                    constant_value(module, node.arg("w_zero_point")), p.k, p.n,
                                    p.blocking.groups)
        layout.zero_codes(zc)
    except layout.Unsupported as e:
        return str(e)
    return None


# MatMulNBits accuracy_level 4: onnxruntime quantizes the activations to int8 per block.
INT8_ACCURACY_LEVEL = 4


# numerics=auto picks the lut kernel for codes of at most this many bits, in a one-row
# qmatmul (a static M of 1: decode), on x86: there its tables cost one row's work and its
# lookups beat the int8 kernel's unpacking. Measured at 4096 x 4096, block 128, M = 1, warm
# (bench_cpu_lut.py): 2-bit lut / 2-bit int8 1.2x (Zen 4, vpermb), 1.7x (AVX2 code on a
# Zen 4); 3-bit lut loses to int8 (0.7x). At M = 16 and more, lookups are per row while
# the int8 kernel reuses each unpacked weight over the rows: int8 there.
LUT_AUTO_MAX_BITS = 2


def node_numerics(module: Module, node, target) -> str:
    """``numerics=auto``: for a qmatmul whose model allows int8 activations
    (``accuracy_level`` 4), ``lut`` when it has one row and codes of up to
    ``LUT_AUTO_MAX_BITS`` bits on x86 (the tables round like int8 activations), else ``int8``
    when the target's int8 kernel can compute it; otherwise ``exact``."""
    from qcompiler.codegen.cpu.host import target_cpu

    if node.attrs.get("accuracy_level") != INT8_ACCURACY_LEVEL:
        return "exact"
    if (batch_rows(node) == 1 and target_cpu(target)["arch"] == "x86_64"
            and node.attrs["w_scheme"].bits <= LUT_AUTO_MAX_BITS
            and unsupported_reason(module, node, target, "lut") is None):
        return "lut"
    if unsupported_reason(module, node, target, "int8") is None:
        return "int8"
    return "exact"


def logged_numerics(replay, target, device: str, module: Module, node, chosen: str) -> str:
    """``numerics=auto`` with a tuning log: of the int8-accuracy numerics an accuracy_level-4
    qmatmul allows (``int8``, ``lut``, where the target's kernels compute it), the one whose
    logged kernels are fastest summed over the node's batch buckets (the static M, or M = 1,
    16, 128 of a symbolic batch); ``chosen`` (the heuristic's) unless the log measured
    another at every bucket and it is faster. Looking both up also tells the tuner to tune
    both (``recording_lookups``)."""
    from qcompiler.codegen.cpu import tuning

    if node.attrs.get("accuracy_level") != INT8_ACCURACY_LEVEL:
        return chosen
    rows = batch_rows(node)
    ms = [max(rows, 1)] if rows is not None else list(M_BUCKETS)
    totals = {}
    for numerics in ("int8", "lut"):
        if unsupported_reason(module, node, target, numerics) is not None:
            continue
        records = []
        for m in ms:  # every bucket looked up (none skipped: the tuner learns its keys so)
            key = node_key(node, m, numerics)
            records.append(replay.best_record(target.name, device, key, check=lambda c, key=key:
                                              tuning.check_config(target, key, c)))
        if all(r is not None for r in records):
            totals[numerics] = sum(r["latency_us"]["median"] for r in records)
    if not totals:
        return chosen
    best = min(totals, key=totals.get)
    return best if chosen not in totals or totals[best] < totals[chosen] else chosen


@register_pass("cpu-schedule")
@dataclass
class CPUSchedulePass(Pass):
    """Choose numerics, tile and per-batch kernel variants of each qmatmul for a cpu target."""

    target: str = "cpu"
    numerics: str = "auto"
    tuning_log: str = ""

    def run(self, module: Module) -> Module:
        from qcompiler.codegen.cpu import kernels, tuning
        from qcompiler.codegen.cpu.host import target_cpu

        tgt = self.backend_target("cpu")
        if self.numerics not in kernels.NUMERICS + ("auto",):
            raise PassError(f"cpu-schedule: numerics={self.numerics!r}; choose one of auto, "
                            f"{', '.join(kernels.NUMERICS)}")
        cpu = target_cpu(tgt)
        device = replay = None
        if self.tuning_log:
            from qcompiler.tuning.device import device_name
            from qcompiler.tuning.log import Replay

            device, replay = device_name(tgt), Replay(self.tuning_log)
        counts = {"tvm": 0, "reference": 0, "tuning_log": 0}
        by_numerics: dict = {}
        # (lut lookups: whether the model's weights outgrow this host's last-level cache)
        from qcompiler.codegen.cpu.host import llc_bytes

        weight_bytes = model_weight_bytes(module)
        llc = 0 if tgt.params.get("mcpu") else llc_bytes()
        for node in module.main.nodes:
            if node.op != "qmatmul":
                continue
            numerics = self.numerics
            if node.attrs["act"] != "float":
                reason = f"act={node.attrs['act']}: the CPU kernels take float activations"
            elif node.attrs.get("epilogue_pairs"):
                reason = "an epilogue over column pairs (fuse-gate-up) has no CPU kernel"
            else:
                if numerics == "auto":
                    numerics = node_numerics(module, node, tgt)
                    if replay is not None:
                        numerics = logged_numerics(replay, tgt, device, module, node, numerics)
                reason = unsupported_reason(module, node, tgt, numerics)
            if reason:
                warnings.warn(f"cpu-schedule: %{node.result.name} runs on the numpy reference: "
                              f"{reason}", stacklevel=2)
                node.attrs["config"] = {"impl": "reference", "reason": reason}
                counts["reference"] += 1
                continue
            rows = batch_rows(node)
            buckets = ((rows, 0),) if rows is not None else SYMBOLIC_BUCKETS
            variants = []
            for m, max_m in buckets:
                key = node_key(node, max(m, 1), numerics)
                cfg, source = None, "heuristic"
                if self.tuning_log:
                    # A logged config that fails the validator is skipped with a warning.
                    cfg = replay.best_config(tgt.name, device, key, check=lambda c, key=key:
                                             tuning.check_config(tgt, key, c))
                    source = "tuning-log" if cfg is not None else source
                if cfg is None:
                    cfg = tuning.default_config(tgt, key)
                variants.append({**cfg, "m": max(m, 1), "max_m": max_m, "source": source})
                counts["tuning_log"] += source == "tuning-log"
            if numerics == "lut":
                # the table group shapes the packed codes, which every batch size shares:
                # the smallest M's choice holds for all (its k_unroll values suit either)
                for v in variants[1:]:
                    v["table_group"] = variants[0]["table_group"]
            p = tuning.problem(tgt, node_key(node, 1, numerics))
            node.attrs["config"] = {
                "impl": "tvm", "numerics": numerics, "n_tile": p.n_tile,
                "lanes": p.lanes, "mcpu": cpu["mcpu"],
                "source": "tuning-log" if any(v["source"] == "tuning-log" for v in variants)
                else "heuristic",
                "variants": {f"v{i}": v for i, v in enumerate(variants)}}
            if numerics == "lut":
                node.attrs["config"]["byte_permute"] = int(tuning.lut_byte_permute(
                    tuning.with_table_group(p, variants[0]), weight_bytes, llc))
            counts["tvm"] += 1
            by_numerics[numerics] = by_numerics.get(numerics, 0) + 1
        record_stat(module, self.name, kernels=counts["tvm"], on_reference=counts["reference"],
                    from_tuning_log=counts["tuning_log"], numerics=self.numerics,
                    **{f"numerics_{k}": v for k, v in sorted(by_numerics.items())})
        return module
