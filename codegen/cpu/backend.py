"""The CPU backend: TVM-compiled kernels for the qmatmuls and for every other op of the plan.

Stages: QIR after ``cpu-schedule`` and ``cpu-pack-weights`` -> per qmatmul a TensorIR module
with one scheduled function per batch-size variant (``kernels.py``) -> LLVM for the target's
-mcpu -> ``kernels/qmm_<key>.so`` plus ``kernels/qmm_<key>.tir.py`` (the scheduled TensorIR,
for people), one per distinct kernel: the key hashes the TensorIR text and the LLVM target
(``qcompiler.codegen.build``), so nodes of one shape and config share a library, and a library
built by an earlier compile comes from the build cache.

Every other kernel step of the executable plan (``qcompiler.plan``: not a view, a host shape
function or a weight) gets a kernel from the op library (``codegen/cpu/ops``), all of them in
ONE library per model, ``kernels/ops_<key>.so`` (key over its TVMScript, the LLVM target and
the versions). A qmatmul's bias and epilogue become an in-place ``fused_elementwise`` kernel
of that library over the qmatmul's output. A node the op library refuses is a *host fallback*
(the reference op runs it): listed in the manifest and the reports and warned about once. A
qmatmul that would run in the interpreter (``impl: reference``: int8 activations, float zero
points, non-f32 activations ...) refuses the compile with ``HostFallbackError`` unless
``allow_host_fallback``.

``runner`` runs the plan with ``PlanExecutor``: op kernels bound once per (bucket, input
signature) to their arena views, qmatmul kernels writing into their out views, host fallbacks
through the reference op. ``QC_PLAN=0`` runs the whole graph in the reference interpreter
instead (with only the qmatmul kernels compiled): a debugging aid to tell a plan or op-kernel
bug from a qmatmul one.
"""
from __future__ import annotations

import os

import numpy as np

from qcompiler.codegen import Backend
from qcompiler.codegen.cpu.config import validate as validate_config
from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.codegen.cpu.ops.common import launch_constants
from qcompiler.errors import ArtifactError, DeviceUnavailableError, HostFallbackError
from qcompiler.ir.core import constant_value
from qcompiler.ir.ops import qmatmul_epilogue_operands
from qcompiler.targets import get_target


def _problem(target, node):
    from qcompiler.codegen.cpu import tuning

    lay = node.arg("w").type.layout
    if lay is None or lay.name not in ("cpu_exact", "cpu_vnni", "cpu_lut"):
        raise CPUBackendError(f"%{node.result.name}: weights are not packed for the CPU "
                              "(run cpu-pack-weights after cpu-schedule)")
    return tuning.problem_from_layout(target, lay, node.attrs["config"])


def _packed(module, node) -> dict:
    perm = None
    lay = node.arg("w").type.layout
    if lay.get("act_order"):
        from qcompiler.codegen.cpu import layout

        perm = layout.act_order_permutation(constant_value(module, node.arg("g_idx")),
                                            lay.get("block"), lay.get("k"))
    zc = constant_value(module, node.arg("w_zero_point"))
    shared = lay.get("zero_code")
    if shared is not None:
        # the kernels take the layout's zero code for every column (the table unread): a
        # table that disagrees (hand-written IR) would compute another model than ref's
        from qcompiler.codegen.cpu import layout

        real = layout.untile_columns(np.asarray(zc))[:, :lay.get("n")]
        if real.size and layout.uniform_zero_code(real) != shared:
            raise CPUBackendError(f"%{node.result.name}: its weight layout says zero_code="
                                  f"{shared} but its zero-point table holds "
                                  f"{np.unique(real).tolist()[:4]}")
    return {"w": constant_value(module, node.arg("w")),
            "s": constant_value(module, node.arg("w_scale")),
            "zc": zc, "perm": perm}


def _check_numerics_on_target(target, node) -> None:
    """Refuse an int8 VNNI config (16 int32 lanes: vpdpbusd on zmm) for a target without
    AVX-512 VNNI, and numerics an aarch64 target has no kernel for, before LLVM sees it.

    cpu-schedule never writes one there, but a config can also come from ``.qir`` text or a
    module scheduled for another target; LLVM then aborts the process (exit 134) instead of
    raising."""
    from qcompiler.codegen.cpu import layout
    from qcompiler.codegen.cpu.arm import numerics_reason
    from qcompiler.codegen.cpu.host import target_cpu

    cfg = node.attrs["config"]
    cpu = target_cpu(target)
    reason = numerics_reason(cpu, cfg.get("numerics", "exact"), target.name)
    if reason:  # aarch64: lut everywhere, int8 (sdot) only with +dotprod
        raise CPUBackendError(f"%{node.result.name}: {reason}")
    if (cfg.get("numerics", "exact") == "int8" and cfg.get("lanes") == layout.VNNI_LANES
            and not cpu["vnni"]):
        raise CPUBackendError(f"%{node.result.name}: this numerics=int8 config needs AVX-512 "
                              f"VNNI; target {target.name} (-mcpu={cpu['mcpu']}) has none; "
                              "schedule it for this target (cpu-schedule)")


def _tvm_nodes(module):
    for node in module.main.nodes:
        if node.op == "qmatmul" and node.attrs.get("config", {}).get("impl") == "tvm":
            yield node


class CPUBackend(Backend):
    name = "cpu"
    concat_in_place = True  # PlanExecutor takes slices
    host_fallback_option = True  # compile() takes allow_host_fallback (the driver passes it)

    def prepare(self, target) -> None:
        from qcompiler.codegen.cpu import runtime

        runtime.import_tvm()  # before cpu-schedule asks TVM about the host's CPU

    def compile(self, module, target, out_dir: str, builder=None,
                allow_host_fallback: bool = False) -> list[dict]:
        """Emit and build the kernels: one library per distinct qmatmul kernel key (nodes with
        the same scheduled TensorIR share it) and one op library for the rest of the plan,
        from ``builder``'s cache or built in parallel. Host fallbacks are records with
        ``"host_fallback": True``; qmatmul ones raise HostFallbackError unless allowed."""
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
                calls.append({**record, "impl": "reference", "host_fallback": True,
                              "reason": cfg.get("reason", "no CPU kernel for this qmatmul")})
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
        interpreted = [c for c in calls if c.get("host_fallback")]
        if interpreted and not allow_host_fallback:
            listed = "; ".join(f"%{c['result']} ({c['reason']})" for c in interpreted[:4])
            more = f" and {len(interpreted) - 4} more" if len(interpreted) > 4 else ""
            raise HostFallbackError(
                f"{len(interpreted)} qmatmul(s) would run in the host interpreter on {target.name}: "
                f"{listed}{more}; pass allow_host_fallback=True (--allow-host-fallback) to "
                "run them there")
        ops_build, ops_calls = _ops_library(module, target, kdir, out_dir)
        if ops_build is not None:
            builds[ops_build.key] = ops_build
        calls += ops_calls
        builder.build_many(list(builds.values()), kdir)
        fallbacks = [c for c in calls if c.get("host_fallback")]
        if fallbacks:
            import warnings

            warnings.warn(f"host fallback: {len(fallbacks)} ops: " + ", ".join(
                f"%{c['result']} ({c['op']})" for c in fallbacks), RuntimeWarning, stacklevel=2)
        return calls

    def runner(self, module, manifest: dict, out_dir: str):
        from qcompiler.codegen.cpu import runtime
        from qcompiler.driver.artifact import artifact_path
        from qcompiler.runtime.reference import run

        try:
            target = get_target(manifest["target"])
        except KeyError:
            raise ArtifactError(f"manifest.json: unknown target {manifest['target']!r}") from None
        refusal = _host_cannot_run(manifest)
        if refusal:
            # Lazy, as for a CUDA artifact without a GPU: the artifact loads (it was checked),
            # running it says why it cannot run here; no library of it is ever dlopened.
            def refuse(inputs):
                raise DeviceUnavailableError(refusal)
            return refuse
        libs = {c["result"]: (i, c) for i, c in enumerate(manifest["kernels"])
                if c.get("impl") == "tvm-llvm"}
        kernels = {}
        for node in _tvm_nodes(module):
            if node.result.name not in libs:
                raise CPUBackendError(f"manifest lists no library for %{node.result.name}")
            i, call = libs[node.result.name]
            # Inside the artifact and hash-verified by load, or refused before dlopen.
            library = artifact_path(out_dir, manifest, call["library"], f"kernels[{i}].library")
            p = _problem(target, node)
            kernels[node.result.name] = runtime.QmmKernel(
                library, p, runtime.variant_list(node.attrs["config"]), _packed(module, node))
        threads = os.environ.get("QC_CPU_THREADS")
        if threads:
            runtime.set_num_threads(int(threads))
        if os.environ.get("QC_PLAN") == "0" or not manifest.get("plan"):
            # The reference interpreter with the qmatmul kernels substituted: for debugging
            # (QC_PLAN=0), and for a graph the compile could not plan (the report says why).
            impls = {name: _qmatmul_impl(k) for name, k in kernels.items()}
            return lambda inputs: run(module, inputs, kernels=impls)
        return _plan_runner(module, manifest, out_dir, kernels)


def _host_cannot_run(manifest: dict):
    """Why this host cannot execute the artifact's code (None when it can): code built for an
    AVX-512 -mcpu dies with an illegal instruction on an AVX2-only host, and code for another
    architecture (an Arm target's aarch64 code on x86) cannot even be loaded."""
    from qcompiler.codegen.cpu.host import foreign_arch, host_arch, missing_features

    for mcpu in sorted({c["mcpu"] for c in manifest["kernels"]
                        if isinstance(c.get("mcpu"), str)}):
        arch = foreign_arch(mcpu)
        if arch:
            return (f"this artifact's CPU code was built for {arch} (-mcpu={mcpu}, target "
                    f"{manifest['target']}); this host is {host_arch()}: run it on an {arch} "
                    f"machine (or under qemu-{arch}), or compile it here for --target cpu")
        missing = missing_features(mcpu)
        if missing:
            return (f"this artifact's CPU code was built for -mcpu={mcpu} "
                    f"(target {manifest['target']}); this host lacks "
                    f"{', '.join(sorted(missing))}: compile it here for --target cpu or "
                    f"cpu-x86-avx2")
    return None


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


# --------------------------------------------------------------------------------------------
# the op library: every plan kernel step that is not a qmatmul, and the qmatmuls' epilogues
# --------------------------------------------------------------------------------------------

# IRModules of op libraries by build key, for the build (in this process or a forked worker,
# which inherits this dict: an IRModule is not picklable).
_OPS_MODULES: dict = {}


def epilogue_node(node):
    """A qmatmul's bias and epilogue as one ``fused_elementwise`` node over its product (x0,
    float32: the kernel's output), or None when it has neither. Run in place over the
    qmatmul's output buffer, it leaves the node's result there."""
    from qcompiler.ir.core import Node, Value
    from qcompiler.ir.elementwise_body import Body, Stmt, format_body, parse_body
    from qcompiler.ir.types import TensorType, elem

    bias = node.arg("bias")
    text = node.attrs.get("epilogue")
    if bias is None and text is None:
        return None
    if node.attrs.get("epilogue_pairs"):
        raise CPUBackendError(f"%{node.result.name} = qmatmul: an epilogue over column pairs "
                              "(fuse-gate-up) has no CPU kernel; leave fuse-gate-up out of "
                              "CPU pipelines")
    r = node.result
    product = Value(f"{r.name}.product", TensorType(tuple(r.type.shape), elem("f32")))
    operands = [product]
    stmts = []
    if bias is not None:  # t0 = product + bias; the epilogue's x0 is t0, its x1.. shift by one
        operands.append(bias)
        stmts.append(Stmt("t0", "add", None, ("x0", "x1")))
    shift = 1 if bias is not None else 0

    def renamed(a):
        if not isinstance(a, str) or not shift:
            return a
        if a == "x0":
            return "t0"
        return f"{a[0]}{int(a[1:]) + shift}"

    result = "t0"
    if text is not None:
        body = parse_body(text)
        stmts += [Stmt(renamed(s.dst), s.op, s.attr, tuple(renamed(a) for a in s.args))
                  for s in body.stmts]
        result = renamed(body.result)
        operands += qmatmul_epilogue_operands(node)
    out = Value(f"{r.name}.epilogue", r.type)
    return Node("fused_elementwise", operands, [out],
                {"body": format_body(Body(tuple(stmts), result))})


def _ops_library(module, target, kdir: str, out_dir: str):
    """(KernelBuild of the op library or None, manifest records): the library's record and one
    host-fallback record per node the op library refuses."""
    import functools

    from qcompiler.codegen.build import KernelBuild, file_name
    from qcompiler.codegen.cpu import runtime
    from qcompiler.codegen.cpu.ops.kernel import primfunc_for
    from qcompiler.codegen.cpu.ops.schedule import params_for
    from qcompiler.plan.lower import lower_steps
    from qcompiler.plan.plan import PlanError
    from qcompiler.plan.split import lower_with_tail

    nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
    fallbacks = []
    # The kernels of the plan's steps; past a data-dependent op the plan stops, and the nodes
    # after it are host fallbacks. Where no bucket can be planned (the artifact's report says
    # why) the steps alone still name the kernels.
    try:
        plan, split = lower_with_tail(module, None, CPUBackend.concat_in_place)
    except PlanError:
        split = None
        try:
            plan = lower_steps(module, CPUBackend.concat_in_place)  # no kernel for in-place concats
        except PlanError as e:  # the runner interprets the whole graph then
            return None, [{"op": n.op, "result": n.results[0].name, "impl": "host",
                           "host_fallback": True, "reason": f"no executable plan: {e}"}
                          for n in module.main.nodes if n.op not in ("constant", "qmatmul")]
    if split is not None:
        roots = ", ".join("%" + r for r in plan.tail_roots)
        reason = (f"follows the data-dependent {roots}: the reference interpreter runs it "
                  "after the plan")
        fallbacks = [{"op": nodes[name].op, "result": name, "impl": "host",
                      "host_fallback": True, "reason": reason}
                     for name in split.tail_nodes if nodes[name].op != "qmatmul"]
    params = params_for(target)
    funcs: dict = {}
    kernels: dict = {}     # node -> kernel name
    epilogues: dict = {}   # qmatmul node -> kernel name of its bias + epilogue
    for step in plan.steps:
        if step.kind != "kernel":
            continue
        node = nodes[step.node]
        if node.op == "qmatmul" and node.attrs.get("config", {}).get("impl") != "tvm":
            continue  # runs in the interpreter (already a host-fallback record)
        if node.op == "all_reduce":  # a rank program's collective: no kernel, no fallback
            fallbacks.append({"op": "all_reduce", "result": step.node, "impl": "collective",
                              "engine": "torch.distributed (qcompiler.runtime.collectives)"})
            continue
        target_node = epilogue_node(node) if node.op == "qmatmul" else node
        if target_node is None:
            continue
        try:
            name, func = primfunc_for(target_node, params, module, known=funcs)
        except Exception as e:  # CPUBackendError: no kernel; anything else: a kernel bug
            reason = str(e) if isinstance(e, CPUBackendError) else f"{type(e).__name__}: {e}"
            fallbacks.append({"op": node.op + (" epilogue" if node.op == "qmatmul" else ""),
                              "result": step.node, "impl": "host", "host_fallback": True,
                              "reason": " ".join(reason.split())[:300]})
            continue
        if func is not None:
            funcs[name] = func
        (epilogues if node.op == "qmatmul" else kernels)[step.node] = name
    if not funcs:
        return None, fallbacks
    import tvm

    irmod = tvm.IRModule(funcs)
    source = irmod.script()
    key = runtime.kernel_build_key(source, target)
    _OPS_MODULES[key] = irmod
    library = file_name("ops", key, ".so")
    stem = library[:-len(".so")]
    with open(os.path.join(kdir, stem + ".tir.py"), "w") as f:
        f.write(f"# Scheduled TensorIR of the op library {stem} (TVMScript, tvm "
                f"{tvm.__version__}): one function per distinct op kernel.\n{source}\n")
    build = KernelBuild(key, library, functools.partial(_build_ops_library, key, target))
    build.nodes = [f"{len(kernels)} ops and {len(epilogues)} qmatmul epilogues"]
    from qcompiler.codegen.cpu.host import target_cpu

    record = {"op": "ops", "result": "", "impl": "tvm-llvm-ops",
              "mcpu": target_cpu(target)["mcpu"],
              "library": os.path.relpath(os.path.join(kdir, library), out_dir),
              "source": os.path.relpath(os.path.join(kdir, stem + ".tir.py"), out_dir),
              "kernel_key": key, "functions": len(funcs),
              "kernels": kernels, "epilogues": epilogues}
    return build, [record] + fallbacks


def _build_ops_library(key: str, target, path: str) -> str:
    import tvm

    from qcompiler.codegen.cpu.host import tvm_target

    from qcompiler.codegen.cpu.runtime import export_library

    ex = tvm.compile(_OPS_MODULES[key], target=tvm_target(target))
    export_library(ex, path, target)  # the cross compiler's link for an Arm target
    return path


# --------------------------------------------------------------------------------------------
# running: plan steps over the compiled kernels
# --------------------------------------------------------------------------------------------


class OpKernelStep:
    """A plan step run by one op-library kernel: (operands that are not none, results, then
    the node's launch constants)."""

    def __init__(self, lib, name: str, constants: tuple = ()):
        self.lib, self.name, self.constants = lib, name, tuple(constants)
        self.fn = lib.function(name)

    def __call__(self, args: list, outs: list) -> None:
        from qcompiler.codegen.cpu.ops.library import as_kernel_arg

        self.fn(*[as_kernel_arg(a) for a in args if a is not None],
                *[as_kernel_arg(o) for o in outs], *self.constants)

    def bind(self, args: list, outs: list):
        """A no-argument call over buffers that stay put (arena views, weights, host values)."""
        return self.lib.bind(self.name, [a for a in args if a is not None] + list(outs)
                             + list(self.constants))


class ResizeScalesCheck:
    """A resize step whose scales are read at run time while its output size is fixed at
    compile time (the model declares it): before the kernel, the fed scales must give that
    size, as the reference computes it (int(scale * in) per axis). Otherwise the run stops
    with an InputError naming the node, instead of a result of the declared size that the
    scales do not describe."""

    def __init__(self, inner, node):
        self.inner, self.node = inner, node
        rank = len(node.operands[0].type.shape)
        self.axes = [a % rank for a in node.attrs["axes"]] or list(range(rank))
        self.out = tuple(node.result.type.shape)

    def check(self, args: list) -> None:
        x, scales = args[0], np.asarray(args[2], np.float64).reshape(-1)
        want = list(x.shape)
        for i, a in enumerate(self.axes[:scales.size]):
            want[a] = int(float(scales[i]) * x.shape[a])
        if tuple(want) != self.out:
            from qcompiler.errors import InputError

            raise InputError(f"%{self.node.result.name} = resize: the scales fed at run time "
                             f"{scales.tolist()} give an output of shape {want}, but the model "
                             f"declares {list(self.out)} and the kernel was compiled for it")

    def __call__(self, args: list, outs: list) -> None:
        self.check(args)
        self.inner(args, outs)

    def bind(self, args: list, outs: list):
        call = self.inner.bind(args, outs)  # the scales' buffer stays put: read each run
        return lambda: (self.check(args), call())


def resize_reads_scales_at_run_time(node, module) -> bool:
    """A resize whose output size is fixed at compile time but whose scales are not known
    until a run (no sizes operand, scales not a constant)."""
    from qcompiler.codegen.cpu.ops.common import constant_operand

    if node.op != "resize" or len(node.operands) < 3 or node.operands[2] is None:
        return False
    sizes = constant_operand(node, 3, module) if len(node.operands) > 3 else None
    if len(node.operands) > 3 and node.operands[3] is not None and sizes is None:
        return False  # sizes fed at run time (the kernel refuses those)
    if sizes is not None and np.asarray(sizes).size:
        return False
    return constant_operand(node, 2, module) is None


class QmatmulStep:
    """A qmatmul step: the kernel writes x @ dequant(w) into the out view (itself where the
    shapes need no padding, else by one copy out of its padded output), then the compiled bias + epilogue kernel runs over it in
    place (into the result buffer from a float32 scratch when the result is not float32)."""

    def __init__(self, node, kernel, lib=None, epilogue: str = None):
        self.node = node
        self.kernel = kernel
        self.k, self.n = kernel.p.k, kernel.p.n
        self.epilogue = lib.function(epilogue) if epilogue else None
        self.epilogue_name = epilogue
        self.lib = lib
        # bias / epilogue without a compiled kernel (a host fallback): the reference applies it
        self.host_epilogue = epilogue is None and (node.arg("bias") is not None
                                                   or "epilogue" in node.attrs)
        self.in_place = node.result.type.dtype.np_dtype == np.float32

    def _epilogue_operands(self, args: list) -> list:
        extra = [args[7]] if len(args) > 7 and args[7] is not None else []
        return extra + [a for a in qmatmul_epilogue_operands(list(args), self.node.attrs)
                        if a is not None]

    def _product_buffer(self, out: np.ndarray) -> np.ndarray:
        if self.in_place:
            return out
        from qcompiler.codegen.cpu.runtime import aligned_empty

        return aligned_empty(out.shape, np.float32)

    def _check(self, x: np.ndarray) -> int:
        if x.shape[-1] != self.k or x.dtype != np.float32:
            raise CPUBackendError(f"%{self.node.result.name} = qmatmul: x is {x.dtype}"
                                  f"{list(x.shape)}, the kernel takes float32 [..., {self.k}]")
        return x.size // self.k

    def __call__(self, args: list, outs: list) -> None:
        from qcompiler.codegen.cpu.ops.library import as_kernel_arg

        x, out = args[0], outs[0]
        m = self._check(x)
        product = self._product_buffer(out)
        y = product.reshape(m, self.n)
        self.kernel.run_into(x.reshape(m, self.k), y, self.kernel.direct_output(y))
        if self.epilogue is not None:
            self.epilogue(*[as_kernel_arg(a) for a in [product] + self._epilogue_operands(args)],
                          as_kernel_arg(out))
        elif self.host_epilogue:
            self._host_epilogue(args, product, out)

    def _host_epilogue(self, args, product, out) -> None:
        from qcompiler.runtime.reference import _apply_epilogue

        y = product
        if len(args) > 7 and args[7] is not None:
            y = y + np.asarray(args[7], np.float32)
        np.copyto(out, _apply_epilogue(self.node, y, args)[0])

    def bind(self, args: list, outs: list):
        x, out = args[0], outs[0]
        m = self._check(x)
        product = self._product_buffer(out)
        x2, y2 = x.reshape(m, self.k), product.reshape(m, self.n)
        product_call = self.kernel.bind(x2, y2)  # wrapped once: these views stay put
        if self.epilogue is None:
            if self.host_epilogue:
                return lambda: (product_call(), self._host_epilogue(args, product, out))
            return product_call
        from qcompiler.codegen.cpu.native_calls import CallSequence

        epilogue = self.lib.bind(self.epilogue_name,
                                 [product] + self._epilogue_operands(args) + [out])
        return CallSequence([product_call, epilogue])


def _manifest_dict(rec: dict, key: str, where: str) -> dict:
    value = rec.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise ArtifactError(f"manifest.json: {where}.{key} must map node names to kernel names")
    return value


def _plan_runner(module, manifest: dict, out_dir: str, qmm_kernels: dict):
    """``run(inputs)`` over the artifact's plan: op kernels, qmatmul kernels, host fallbacks
    through the reference op (the executor's default step)."""
    from qcompiler.codegen.cpu.ops.library import OpsLibrary
    from qcompiler.driver.artifact import artifact_path
    from qcompiler.plan.executor import PlanExecutor
    from qcompiler.plan.plan import plan_from_json

    plan = plan_from_json(manifest["plan"])
    nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
    lib, kernels, epilogues = None, {}, {}
    for i, rec in enumerate(manifest["kernels"]):
        if rec.get("impl") != "tvm-llvm-ops":
            continue
        where = f"kernels[{i}]"
        if not isinstance(rec.get("library"), str):
            raise ArtifactError(f"manifest.json: {where}.library must be a string")
        kernels = _manifest_dict(rec, "kernels", where)
        epilogues = _manifest_dict(rec, "epilogues", where)
        lib = OpsLibrary(artifact_path(out_dir, manifest, rec["library"], f"{where}.library"))
    impls = {}
    for name, kernel_name in kernels.items():
        if name not in nodes:
            raise ArtifactError(f"manifest.json: the op library names %{name}, which the "
                                "module does not define")
        impls[name] = OpKernelStep(lib, kernel_name, launch_constants(nodes[name]))
        if resize_reads_scales_at_run_time(nodes[name], module):
            impls[name] = ResizeScalesCheck(impls[name], nodes[name])
    if not plan.tail_roots:
        for name, kernel in qmm_kernels.items():
            impls[name] = QmatmulStep(nodes[name], kernel, lib, epilogues.get(name))
        return PlanExecutor(plan, module, impls).run
    # A plan up to data-dependent ops (qcompiler/plan/split.py): the head's steps compiled,
    # the tail interpreted after it, its qmatmuls still the compiled kernels.
    from qcompiler.plan.split import TailRunner, split_module

    split = split_module(module, plan.tail_roots)
    in_tail = set(split.tail_nodes)
    for name, kernel in qmm_kernels.items():
        if name not in in_tail:
            impls[name] = QmatmulStep(nodes[name], kernel, lib, epilogues.get(name))
    head = PlanExecutor(plan, split.head, impls).run
    tail_kernels = {name: _qmatmul_impl(k) for name, k in qmm_kernels.items() if name in in_tail}
    return TailRunner(split, head, module.main.output_names, tail_kernels).run
