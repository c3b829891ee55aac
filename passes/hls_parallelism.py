"""hls-parallelism: choose PE and SIMD of every layer of an FPGA design within the part's budget.

Needs ``hls-fixed-point`` first: the cost model (``codegen/hls/cost_model.py``) reads the
widths that pass writes into each qmatmul's ``config``. This pass adds ``pe`` (output channels
computed in parallel; divides ``n``) and ``simd`` (32-bit weight words per PE per cycle;
divides ``words_per_group``), chosen by ``choose_parallelism`` so that the DATAFLOW design has
the smallest interval, then latency, with every resource at most ``utilization`` of the
target's ``resources``. Values already in ``config`` are recomputed. The design's estimate
(Vitis csynth report keys, per-layer breakdown) goes to ``module.metadata["hls_estimate"]``.

With ``tuning_log=PATH`` (written by ``qcompile --tune``), every layer takes the best record of
its kernel key for this target and part instead (``codegen/hls/tuning.py``); when a layer has
no record, or the logged choices together exceed the budget (records from different designs),
the whole design falls back to the heuristic. ``config["source"]`` says which one was used:
``"tuning-log"`` or ``"heuristic"``.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.codegen.hls.cost_model import RESOURCES, choose_parallelism, estimate_design
from qcompiler.ir import Module
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass


@register_pass("hls-parallelism")
@dataclass
class HLSParallelismPass(Pass):
    """Choose PE/SIMD per FPGA layer: fastest design within a fraction of the part's budget."""

    target: str = "fpga-u250"
    utilization: float = 0.8  # the largest fraction of each resource the design may use
    tuning_log: str = ""  # a tuning log to replay (JSON Lines); empty: the heuristic

    def run(self, module: Module) -> Module:
        tgt = self.backend_target("hls")
        budget = tgt.params.get("resources")
        if not budget:
            raise PassError(f"hls-parallelism: target {self.target!r} has no resource budget")
        if not 0 < self.utilization <= 1:
            raise PassError(f"hls-parallelism: utilization={self.utilization} must be in (0, 1]")
        from qcompiler.codegen.hls.cnn import is_cnn_design

        if is_cnn_design(module):
            return self._run_cnn(module, tgt, budget)
        nodes = [n for n in module.main.nodes if n.op == "qmatmul"]
        for node in nodes:
            if "x_width" not in node.attrs.get("config", {}):
                raise PassError(f"hls-parallelism: %{node.result.name} has no fixed-point "
                                "config; run hls-fixed-point first")
        cfgs = [node.attrs["config"] for node in nodes]
        par = self._from_log(tgt, nodes, cfgs, budget) if self.tuning_log else None
        source = "tuning-log" if par else "heuristic"
        if par is None:
            try:
                par = choose_parallelism(cfgs, budget, self.utilization)
            except ValueError as e:
                raise PassError(f"hls-parallelism: {e} on {self.target} ({tgt.description})") \
                    from None
        for node, cfg, (pe, simd) in zip(nodes, cfgs, par):
            node.attrs["config"] = {**cfg, "pe": pe, "simd": simd, "source": source}
        est = estimate_design([(node.attrs["config"], pe, simd)
                               for node, (pe, simd) in zip(nodes, par)])
        for node, layer in zip(nodes, est["layers"]):
            layer["name"] = node.result.name
        clock_mhz = tgt.params.get("clock_mhz")
        est.update({
            "target": tgt.name, "part": tgt.params.get("part"), "clock_mhz": clock_mhz,
            "TargetClockPeriod": round(1e3 / clock_mhz, 3) if clock_mhz else None,
            "utilization": self.utilization,
            **{f"Available{r}": budget.get(r) for r in RESOURCES},
        })
        module.metadata["hls_estimate"] = est
        record_stat(module, self.name, layers=len(nodes), IntervalMin=est["IntervalMin"],
                    BestLatency=est["BestLatency"], source=source,
                    **{r: est[r] for r in RESOURCES})
        return module

    def _run_cnn(self, module: Module, tgt, budget: dict) -> Module:
        """PE (output channels) and SIMD (taps) of every conv of a CNN design; pools and
        stream copies have none. The heuristic only (tuning logs key qmatmul kernels)."""
        from qcompiler.codegen.hls.cnn import cnn_design

        layers = cnn_design(module)[0]
        cfgs = [l.cfg for l in layers]
        try:
            par = choose_parallelism(cfgs, budget, self.utilization)
        except ValueError as e:
            raise PassError(f"hls-parallelism: {e} on {self.target} ({tgt.description})") \
                from None
        for layer, (pe, simd) in zip(layers, par):
            if layer.kind == "conv":
                layer.node.attrs["config"] = {**(layer.node.attrs.get("config") or {}),
                                              "pe": pe, "simd": simd, "source": "heuristic"}
        est = estimate_design([(c, pe, simd) for c, (pe, simd) in zip(cfgs, par)])
        for layer, entry in zip(layers, est["layers"]):
            entry["name"] = layer.name if layer.node is None else layer.node.result.name
            entry["kind"] = layer.kind
        clock_mhz = tgt.params.get("clock_mhz")
        est.update({
            "target": tgt.name, "part": tgt.params.get("part"), "clock_mhz": clock_mhz,
            "TargetClockPeriod": round(1e3 / clock_mhz, 3) if clock_mhz else None,
            "utilization": self.utilization,
            **{f"Available{r}": budget.get(r) for r in RESOURCES},
        })
        module.metadata["hls_estimate"] = est
        record_stat(module, self.name, layers=len(layers), IntervalMin=est["IntervalMin"],
                    BestLatency=est["BestLatency"], source="heuristic",
                    pe_simd=[[e["name"], e["pe"], e["simd"]] for e in est["layers"]],
                    **{r: est[r] for r in RESOURCES})
        return module

    def _from_log(self, tgt, nodes, cfgs, budget):
        """(pe, simd) per layer from the tuning log, or None (with a warning) to fall back."""
        import warnings

        from qcompiler.codegen.hls.cost_model import _over_budget
        from qcompiler.tuning.device import device_name
        from qcompiler.tuning.key import kernel_key
        from qcompiler.codegen.hls.config import check_parallelism
        from qcompiler.tuning.log import Replay, best_record

        records = Replay(self.tuning_log).records  # a missing file is an InputError
        device = device_name(tgt)
        par = []
        for node, cfg in zip(nodes, cfgs):
            # per_config=False: each record scores a whole design; take the best design's
            best = best_record(records, tgt.name, device, kernel_key(node, 1), per_config=False)
            if best is None:
                warnings.warn(f"hls-parallelism: {self.tuning_log} has no record for "
                              f"%{node.result.name} on {tgt.name} ({device}); using the "
                              "heuristic for the design", stacklevel=2)
                return None
            pe, simd = best["config"].get("pe"), best["config"].get("simd")
            problem = check_parallelism(cfg, pe, simd)  # the backend's validator
            if problem:
                warnings.warn(f"hls-parallelism: logged pe={pe!r}, simd={simd!r} do not fit "
                              f"%{node.result.name} ({problem}); using the heuristic",
                              stacklevel=2)
                return None
            par.append((pe, simd))
        est = estimate_design([(c, pe, simd) for c, (pe, simd) in zip(cfgs, par)])
        over = _over_budget(est, budget, self.utilization)
        if over:
            warnings.warn(f"hls-parallelism: the logged choices together exceed the budget "
                          f"({'; '.join(over)}); using the heuristic", stacklevel=2)
            return None
        return par
