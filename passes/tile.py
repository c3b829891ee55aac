"""tile: decide each packed qmatmul's kernel variants (kernel, tile, warps, stages, split-K).

Needs ``schedule-unpack`` first. M is dynamic, so one variant is chosen per M bucket
(``M <= 8``, ``<= 16``, ``<= 32``, ``<= 64``, ``<= 128``, ``<= 512``: the prefill bucket, and
larger: the long-prompt bucket, keyed at 4096 rows); the generated host code dispatches on M. A variant picks the kernel (``gemv``:
the split-K GEMV kernel; ``wgmma``: on cuda-sm90 with 4-bit codes, the wgmma/TMA kernel; else
the tiled mma.sync one) and its parameters. Each
variant comes from the tuning log when ``tuning_log`` is given and holds a record for that
(target, device, kernel key), else from the heuristic ``codegen/cuda/tuning.default_config``.
A logged config that fails the backend's validator (``codegen/cuda/config.py``) is skipped
with a warning.
Written to ``config["variants"]`` as ``{"m16": {...}, ...}``, each with ``source``
(``heuristic`` or ``tuning-log``).

``int8_min_m`` (default 0: off): buckets of at least this many rows take the tiled kernel
with int8 activations (W4A8 / W8A8 on int8 tensor cores, ``include/qcompiler/tiled_i8.cuh``)
on every qmatmul whose ``accuracy_level`` is 4 (MatMulNBits's permission; the CPU backend's
``int8`` numerics, x quantized per row and group) and whose weights it takes
(``config.int8_weight_reason``), unless a tuning-log record decides the bucket. Off by default
until it has been measured on a GPU against the f16 kernels.

``gemv_fill`` (default 0: off): the GEMV heuristic also splits K where that lowers the
largest share of the grid one SM runs (``tuning.gemv_default``'s ``fill``: a decode's small
projections leave most SMs idle). Timed in the 22-layer decode graph on an H100 (2026-12-07,
``benchmarks/results/gpu-h100-20261207-1239/``): 0.941 ms against 0.926 without, so off.

``gemv_acc_scale`` (default 1: on): GEMV variants whose every warp's run of k16 steps lies in
one group multiply the warp's fp32 sums by the group's scales after the loop instead of every
weight pair by its scale in it (``acc_scale=1``, ``include/qcompiler/gemv.cuh``): 16 fewer
instructions a k16 step in a loop that is issue-bound at small M. The 8-layer decode graph on
an H100: 0.352 -> 0.339 ms (2026-12-07, ``benchmarks/results/gpu-h100-20261207-1540/``).

``wgmma_stages`` (default 0: ``tuning.WGMMA_STAGES``, 6): the deepest TMA ring the wgmma
kernel's heuristic gives a variant (the deepest that fits in shared memory, at most this many
stages of 64 K rows, at most ``config.WGMMA_MAX_STAGES``).

``wgmma_pdl`` (default 0: off): the wgmma kernels (prefill) take programmatic dependent
launch: a kernel may start before the previous one has finished, its producer issuing the
first ring's weights before it waits for that kernel's output (``include/qcompiler/wgmma.cuh``,
``produce_ring``). Written to the node's config (``wgmma_pdl``). Off until timed on a GPU.

``fp8_min_m`` (default 0: off): the same for FP8 e4m3 activations, on qmatmuls with FP8 e4m3
weights on targets with FP8 MMA (sm_89, sm_90): W8A8-FP8, x quantized per row (per-channel
weights) or group to e4m3 with scale max|x|/448. ONNX has no attribute that permits it: this
option is the user's permission (``cases.fp8_model`` gives its numerics).
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.codegen.cuda import tuning
from qcompiler.codegen.cuda.config import WGMMA_MAX_STAGES, fp8_weight_reason
from qcompiler.ir import Module
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass
from qcompiler.tuning.key import kernel_key

# The last bucket also serves every larger M. 512 and 4096 are apart because the best prefill
# tile differs: on 2048-wide layers M tiles of 128 on one warpgroup at 512 rows, 256 x 128
# tiles at 4096 (2x faster there, benchmarks/results/prefill-gemm-h200-20261204-0726.json).
M_BUCKETS = (8, 16, 32, 64, 128, 512, 4096)


def _log_check(target, key):
    """The validator applied to a tuning log's configs (a rejected record is skipped with a
    warning and the heuristic or the next best record is used)."""
    def check(config: dict):
        missing = [k for k in tuning.KNOBS if k not in config]
        if missing:
            # Tuned before these knobs existed (e.g. gemv): its kernel choice is stale, not
            # wrong; the heuristic is the better default.
            return f"its config predates the knobs {missing} (tune again to replace it)"
        return tuning.check_config(target, key, config)
    return check


@register_pass("tile")
@dataclass
class TilePass(Pass):
    """Choose the kernel, tile, warps, stages and split-K per M bucket (log or heuristic)."""

    target: str = "cuda-sm90"
    tuning_log: str = ""
    int8_min_m: int = 0
    fp8_min_m: int = 0
    gemv_fill: int = 0
    gemv_acc_scale: int = 1
    wgmma_stages: int = 0
    wgmma_pdl: int = 0

    def run(self, module: Module) -> Module:
        tgt = self.backend_target("cuda")
        if not 0 <= self.wgmma_stages <= WGMMA_MAX_STAGES:
            raise PassError(f"tile: wgmma_stages={self.wgmma_stages} not in [0, "
                            f"{WGMMA_MAX_STAGES}] (0: the heuristic's)")
        device = None
        if self.tuning_log:
            from qcompiler.tuning.device import device_name
            from qcompiler.tuning.log import Replay

            device, replay = device_name(tgt), Replay(self.tuning_log)
        count = int8_buckets = fp8_buckets = 0
        for node in module.main.nodes:
            if node.op != "qmatmul":
                continue
            cfg = node.attrs.get("config", {})
            if "unpack" not in cfg:
                raise PassError(f"tile: %{node.result.name} has no unpack schedule; run "
                                "reorder-weights and schedule-unpack first")
            variants = {}
            for m_max in M_BUCKETS:
                key = kernel_key(node, m_max)
                chosen, source = None, "heuristic"
                if self.tuning_log:
                    chosen = replay.best_config(tgt.name, device, key,
                                                check=_log_check(tgt, key))
                    source = "tuning-log" if chosen is not None else source
                if chosen is None:
                    chosen = tuning.default_config(tgt, key, bool(self.gemv_fill),
                                                   bool(self.gemv_acc_scale),
                                                   self.wgmma_stages)
                    if self._takes_int8(node, key, m_max):
                        chosen = tuning.int8_default(tgt, key)
                        int8_buckets += 1
                    elif 0 < self.fp8_min_m <= m_max and \
                            fp8_weight_reason(tgt, key) is None:
                        chosen = tuning.fp8_default(tgt, key)
                        fp8_buckets += 1
                # A dict keyed by bucket: the IR's attribute lists hold numbers only.
                variants[f"m{m_max}"] = {
                    "m_max": m_max, "source": source,
                    **{k: int(chosen[k]) for k in tuning.KNOBS},
                    **{k: int(chosen.get(k, d)) for k, d in tuning.OPTIONAL_KNOBS.items()}}
            node.attrs["config"] = {**cfg, "target": tgt.name, "variants": variants,
                                    **({"wgmma_pdl": 1} if self.wgmma_pdl else {})}
            count += 1
        record_stat(module, self.name, tiled=count, int8_buckets=int8_buckets,
                    fp8_buckets=fp8_buckets)
        return module

    def _takes_int8(self, node, key: dict, m_max: int) -> bool:
        """The int8 kernel for this bucket: asked for from this size, permitted by the
        model, and able to take the weights."""
        return 0 < self.int8_min_m <= m_max and tuning.int8_permitted(key)
