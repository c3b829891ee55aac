"""The CPU backend: a TVM-compiled library per distinct qmatmul kernel; numpy runs the rest.

Stages: QIR after ``cpu-schedule`` and ``cpu-pack-weights`` -> per qmatmul a TensorIR module
with one scheduled function per batch-size variant (``kernels.py``) -> LLVM for the target's
-mcpu -> ``kernels/qmm_<key>.so`` plus ``kernels/qmm_<key>.tir.py`` (the scheduled TensorIR,
for people), one per distinct kernel: the key hashes the TensorIR text and the LLVM target
(``qcompiler.codegen.build``), so nodes of one shape and config share a library, and a library
built by an earlier compile comes from the build cache. ``runner`` loads the libraries and
runs the graph with the reference interpreter, substituting the kernels for their qmatmuls
(``qcompiler.runtime.reference.run(kernels=...)``).
"""
from __future__ import annotations

import os

import numpy as np

from qcompiler.codegen import Backend
from qcompiler.codegen.cpu.config import validate as validate_config
from qcompiler.errors import ArtifactError, QCompilerError
from qcompiler.ir.core import constant_value
from qcompiler.targets import get_target


class CPUBackendError(QCompilerError, RuntimeError):
    """The module cannot be compiled or run by the CPU backend; the message says why."""


def _problem(target, node):
    from qcompiler.codegen.cpu import tuning

    lay = node.operands[1].type.layout
    if lay is None or lay.name not in ("cpu_exact", "cpu_vnni"):
        raise CPUBackendError(f"%{node.result.name}: weights are not packed for the CPU "
                              "(run cpu-pack-weights after cpu-schedule)")
    return tuning.problem_from_layout(lay, node.attrs["config"])


def _packed(module, node) -> dict:
    perm = None
    lay = node.operands[1].type.layout
    if lay.get("act_order"):
        from qcompiler.codegen.cpu import layout

        perm = layout.act_order_permutation(constant_value(module, node.operand(4)),
                                            lay.get("block"), lay.get("k"))
    return {"w": constant_value(module, node.operands[1]),
            "s": constant_value(module, node.operands[2]),
            "zc": constant_value(module, node.operands[3]),
            "perm": perm}


def _check_numerics_on_target(target, node) -> None:
    """Refuse an int8 (VNNI) config for a target without AVX-512 VNNI before LLVM sees it.

    cpu-schedule refuses numerics=int8 there, but a config can also come from ``.qir`` text or
    a module scheduled for another target; LLVM then aborts the process (exit 134) instead of
    raising."""
    from qcompiler.codegen.cpu.host import target_cpu

    numerics_mode = node.attrs["config"].get("numerics", "exact")
    cpu = target_cpu(target)
    if numerics_mode == "int8" and not cpu["vnni"]:
        raise CPUBackendError(f"%{node.result.name}: numerics=int8 needs AVX-512 VNNI; target "
                              f"{target.name} (-mcpu={cpu['mcpu']}) has none; reschedule with "
                              "cpu-schedule{numerics=exact}")


def _tvm_nodes(module):
    for node in module.main.nodes:
        if node.op == "qmatmul" and node.attrs.get("config", {}).get("impl") == "tvm":
            yield node


class CPUBackend(Backend):
    name = "cpu"

    def prepare(self, target) -> None:
        from qcompiler.codegen.cpu import runtime

        runtime.import_tvm()  # before cpu-schedule asks TVM about the host's CPU

    def compile(self, module, target, out_dir: str, builder=None) -> list[dict]:
        """Emit and build the kernels: one library per distinct kernel key (nodes with the
        same scheduled TensorIR share it), from ``builder``'s cache or built in parallel."""
        import functools

        from qcompiler.codegen.build import Builder, KernelBuild, file_name
        from qcompiler.codegen.cpu import runtime
        from qcompiler.codegen.cpu.host import target_cpu

        builder = builder or Builder()
        kdir = os.path.join(out_dir, "kernels")
        os.makedirs(kdir, exist_ok=True)
        calls = []
        builds: dict[str, KernelBuild] = {}   # by key, in first-use order
        sources: dict[str, tuple] = {}        # (shape, variants) -> (source, key): once each
        for node in module.main.nodes:
            if node.op != "qmatmul":
                continue
            cfg = node.attrs.get("config", {})
            record = {"op": "qmatmul", "result": node.result.name,
                      "x": list(node.operands[0].type.shape),
                      "w_scheme": str(node.attrs["w_scheme"]), "act": node.attrs["act"],
                      "config": cfg}
            if cfg.get("impl") != "tvm":
                if "impl" not in cfg:
                    raise CPUBackendError(f"%{node.result.name} has no CPU config; the "
                                          "pipeline must run cpu-schedule and cpu-pack-weights")
                calls.append({**record, "impl": "reference"})
                continue
            _check_numerics_on_target(target, node)
            validate_config(cfg, node, target)  # whatever its source: pass, log or .qir
            p = _problem(target, node)
            ks, variants = p.kernel_shape(), runtime.variant_list(cfg)
            shape_id = repr((ks, variants))
            if shape_id not in sources:
                try:
                    source = runtime.scheduled_source(ks, variants)
                except Exception as e:
                    raise CPUBackendError(f"%{node.result.name}: scheduling the kernel failed: "
                                          f"{type(e).__name__}: {e}") from e
                sources[shape_id] = (source, runtime.kernel_build_key(source, target))
            source, key = sources[shape_id]
            if key not in builds:
                library = file_name("qmm", key, ".so")
                builds[key] = KernelBuild(
                    key, library, functools.partial(runtime.compile_library, ks, variants, target))
                stem = library[:-len(".so")]
                with open(os.path.join(kdir, stem + ".tir.py"), "w") as f:
                    f.write(runtime.source_file_text(stem, source))
            build = builds[key]
            build.nodes.append(node.result.name)
            stem = os.path.join(kdir, build.library[:-len(".so")])
            calls.append({**record, "impl": "tvm-llvm",
                          "library": os.path.relpath(stem + ".so", out_dir),
                          "source": os.path.relpath(stem + ".tir.py", out_dir),
                          "kernel_key": key,
                          "mcpu": target_cpu(target)["mcpu"],
                          "functions": [f"qmm_v{i}" for i in range(len(cfg["variants"]))],
                          "k": p.k, "n": p.n})
        builder.build_many(list(builds.values()), kdir)
        return calls

    def runner(self, module, manifest: dict, out_dir: str):
        from qcompiler.codegen.cpu import runtime
        from qcompiler.driver.artifact import artifact_path
        from qcompiler.runtime.reference import run

        try:
            target = get_target(manifest["target"])
        except KeyError:
            raise ArtifactError(f"manifest.json: unknown target {manifest['target']!r}") from None
        libs = {c["result"]: (i, c) for i, c in enumerate(manifest["kernels"])
                if c.get("impl") == "tvm-llvm"}
        impls = {}
        for node in _tvm_nodes(module):
            if node.result.name not in libs:
                raise CPUBackendError(f"manifest lists no library for %{node.result.name}")
            i, call = libs[node.result.name]
            # Inside the artifact and hash-verified by load, or refused before dlopen.
            library = artifact_path(out_dir, manifest, call["library"], f"kernels[{i}].library")
            p = _problem(target, node)
            kernel = runtime.QmmKernel(library, p,
                                       runtime.variant_list(node.attrs["config"]),
                                       _packed(module, node))
            impls[node.result.name] = _qmatmul_impl(kernel)
        threads = os.environ.get("QC_CPU_THREADS")
        if threads:
            runtime.set_num_threads(int(threads))
        if os.environ.get("QC_PLAN") == "1":  # the executable plan (qcompiler.plan), opt-in
            from qcompiler.plan.executor import plan_runner

            return plan_runner(module, manifest, impls)
        return lambda inputs: run(module, inputs, kernels=impls)


def _qmatmul_impl(kernel):
    """The interpreter's op signature around a compiled kernel: leading dims, bias, dtype."""
    def impl(node, args, module):
        x = np.asarray(args[0])
        k = kernel.p.k
        if x.shape[-1] != k:
            raise ValueError(f"%{node.result.name} = qmatmul: x has shape {x.shape}, the kernel "
                             f"takes K = {k}")
        y = kernel(x.reshape(-1, k).astype(np.float32, copy=False))
        bias = args[7] if len(args) > 7 else None
        if bias is not None:
            y = y + np.asarray(bias, np.float32)
        out_dtype = node.result.type.dtype.np_dtype
        return [y.reshape(*x.shape[:-1], kernel.p.n).astype(out_dtype, copy=False)]
    return impl
