"""tile: decide each packed qmatmul's kernel variants (kernel, tile, warps, stages, split-K).

Needs ``schedule-unpack`` first. M is dynamic, so one variant is chosen per M bucket
(``M <= 8``, ``<= 16``, ``<= 32``, ``<= 64``, larger); the generated host code dispatches on
M. A variant picks the kernel (``gemv``: the split-K GEMV kernel or the tiled one) and its
parameters. Each variant comes from the tuning log when ``tuning_log`` is given and holds a
record for that (target, device, kernel key), else from the heuristic
``codegen/cuda/tuning.default_config``.
Written to ``config["variants"]`` as ``{"m16": {...}, ...}``, each with ``source``
(``heuristic`` or ``tuning-log``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from qcompiler.codegen.cuda import tuning
from qcompiler.ir import Module
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass
from qcompiler.tuning.key import kernel_key

M_BUCKETS = (8, 16, 32, 64, 128)  # the last bucket also serves every larger M


@register_pass("tile")
@dataclass
class TilePass(Pass):
    """Choose the kernel, tile, warps, stages and split-K per M bucket (log or heuristic)."""

    target: str = "cuda-sm90"
    tuning_log: str = ""

    def run(self, module: Module) -> Module:
        tgt = self.backend_target("cuda")
        device = None
        if self.tuning_log:
            from qcompiler.tuning.device import device_name
            from qcompiler.tuning.log import Replay

            device, replay = device_name(tgt), Replay(self.tuning_log)
        count = 0
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
                    chosen = replay.best_config(tgt.name, device, key)
                    missing = [k for k in tuning.KNOBS if chosen is not None and k not in chosen]
                    if missing:
                        # Tuned before these knobs existed (e.g. gemv): its kernel choice is
                        # stale, not wrong; the heuristic is the better default.
                        warnings.warn(f"tile: the tuning log's config for %{node.result.name} "
                                      f"M={m_max} predates the knobs {missing}; using the "
                                      "heuristic (tune again to replace it)", stacklevel=2)
                        chosen = None
                    if chosen is not None:
                        why = tuning.check_config(tgt, key, chosen)
                        if why:
                            raise PassError(f"tile: the tuning log's config for "
                                            f"%{node.result.name} M={m_max} is invalid: {why}")
                        source = "tuning-log"
                if chosen is None:
                    chosen = tuning.default_config(tgt, key)
                # A dict keyed by bucket: the IR's attribute lists hold numbers only.
                variants[f"m{m_max}"] = {"m_max": m_max, "source": source,
                                         **{k: int(chosen[k]) for k in tuning.KNOBS}}
            node.attrs["config"] = {**cfg, "target": tgt.name, "variants": variants}
            count += 1
        record_stat(module, self.name, tiled=count)
        return module
