"""The reference backend: no generated code; the numpy interpreter runs the QIR itself.

It is a real target (``ref``) so that a whole model compiles and runs end to end before any
hardware backend exists, and it is what every other backend's output is compared with.
"""
from __future__ import annotations

from qcompiler.codegen import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def compile(self, module, target, out_dir: str, builder=None) -> list[dict]:
        # One record per qmatmul, so that manifests of all backends list the same calls.
        calls = []
        for node in module.main.nodes:
            if node.op == "qmatmul":
                calls.append({
                    "op": node.op, "result": node.result.name, "impl": "reference",
                    "x": list(node.operands[0].type.shape),
                    "w": list(node.arg("w").type.shape),
                    "w_scheme": str(node.attrs["w_scheme"]), "act": node.attrs["act"],
                    "config": {}})
        return calls

    def runner(self, module, manifest: dict, out_dir: str):
        from qcompiler.runtime.reference import run

        return lambda inputs: run(module, inputs)
