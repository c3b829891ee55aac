"""Building single-qmatmul kernels for tests, tuning and benchmarks (GPU machine side).

``build_case`` runs the CUDA pipeline on a random ``cases.Case``, optionally with explicit
variants (the tuner's or a sweep's configs), renders and builds the library, and returns a
``Built``; ``load_kernel`` loads it (``runtime.QmmKernel``). Timing (``time_kernel``,
``time_graph``) needs torch: CUDA graphs and events.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from qcompiler.codegen.cuda import backend, build as nv, cases, tuning
from qcompiler.pipeline import PassManager
from qcompiler.targets import get_target

PIPELINE = "reorder-weights,schedule-unpack,tile{{target={target}}}"


@dataclass
class Built:
    case: cases.Case
    module: object          # before reorder-weights (the reference runs this one)
    packed: object          # after tile
    node: object
    lib: str
    runtime_lib: str
    variants: list


def pack_case(case: cases.Case, target: str = "cuda-sm90", seed: int = 0, module=None):
    module = module if module is not None else cases.make_module(case, seed)
    packed = PassManager.parse(PIPELINE.format(target=target)).run(module)
    node = next(n for n in packed.main.nodes if n.op == "qmatmul")
    return module, packed, node


def set_variants(node, variants: list[dict]) -> None:
    """Give a packed, tiled qmatmul ``node`` these explicit kernel variants (configs with an
    optional ``m_max``, as the tuner and the tests give them) instead of the tile pass's."""
    node.attrs["config"] = {**node.attrs["config"], "variants": {
        f"v{i:02d}": {"m_max": v.get("m_max", 1 << 30), "source": "explicit",
                      **{k: int(v[k]) for k in tuning.KNOBS},
                      **{k: int(v.get(k, d)) for k, d in tuning.OPTIONAL_KNOBS.items()}}
        for i, v in enumerate(variants)}}


def build_case(case: cases.Case, workdir: str, target: str = "cuda-sm90",
               variants: list[dict] | None = None, seed: int = 0, module=None,
               archs: list[str] | None = None) -> Built:
    """Pack, render and build. ``variants`` (configs with ``m_max``) replace the tile pass's."""
    tgt = get_target(target)
    module, packed, node = pack_case(case, target, seed, module)
    if variants is not None:
        set_variants(node, variants)
    params = backend.kernel_params(node, target)
    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, params["symbol"] + ".cu")
    text = backend.render(params)
    if not os.path.exists(src) or open(src).read() != text:
        with open(src, "w") as f:
            f.write(text)
    lib = nv.build_cached(src, src[:-3] + ".so", archs or backend.target_archs(tgt, params))
    archs = archs or backend.target_archs(tgt)
    rt_src = os.path.join(workdir, "qc_runtime.cu")
    if not os.path.exists(rt_src):
        with open(rt_src, "w") as f, open(nv.RUNTIME_SOURCE) as g:
            f.write(g.read())
    rt_lib = nv.build_cached(rt_src, os.path.join(workdir, "qc_runtime.so"), archs)
    return Built(case, module, packed, node, lib, rt_lib, params["variants"])


def load_kernel(built: Built):
    from qcompiler.codegen.cuda.runtime import CudaRuntime, QmmKernel
    from qcompiler.ir.core import constant_value

    rt = CudaRuntime(built.runtime_lib)
    node = built.node
    arrays = {role: constant_value(built.packed, node.operand(i))
              for role, i in (("w", 1), ("scales", 2), ("zeros", 3), ("perm", 4), ("bias", 7))}
    return QmmKernel(rt, built.lib, backend.kernel_symbol(node), arrays,
                     node.result.type.shape[-1], node.result.type.dtype.np_dtype)


def time_graph(launch, copies: int, calls_per_graph: int = 20, replays: int = 20) -> dict:
    """Median per-call µs: ``launch(i)`` (i = weight copy) captured ``calls_per_graph`` times
    in one CUDA graph, the graph replayed ``replays`` times (removes launch gaps)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            launch(i % copies)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls_per_graph):
            launch(i % copies)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / calls_per_graph)
    times.sort()
    return {"median": times[len(times) // 2], "min": times[0], "max": times[-1],
            "runs": replays * calls_per_graph}


CHECK_ROWS = 512  # measure_config checks at most this many rows against the reference


def measure_config(target, key, config, workdir, repeats: int = 50) -> dict:
    """The tuning contract's ``measure``: a fresh random case of ``key``'s shape and format,
    checked against the reference, timed over weight copies larger than L2."""
    from qcompiler.tuning.errors import BuildError, WrongResult

    case = case_from_key(key)
    try:
        built = build_case(case, workdir, target.name, variants=[config])
    except nv.BuildError as e:
        raise BuildError(str(e)) from None
    kern = load_kernel(built)
    m = key["m"]
    x = cases.random_x(case, m, seed=int.from_bytes(os.urandom(4), "little"))
    kern.bench_variant = 0
    y = kern.run_numpy(x, variant=0)
    # Rows are computed alike and checked alike (the references are row by row): above
    # CHECK_ROWS rows the first and last CHECK_ROWS / 2 (the first and last M tiles), so that
    # the numpy reference of a 4096-row layer does not outlast the timing.
    if m > CHECK_ROWS:
        rows = list(range(CHECK_ROWS // 2)) + list(range(m - CHECK_ROWS // 2, m))
        x, y = x[rows], y[rows]
    # 8-bit activations: against the model of their numerics (cases.int8_model, fp8_model), whose
    # quantization error is far above the float kernels' tolerance.
    if config.get("int8", 0):
        ref, tol = cases.int8_model(built.module, x), cases.INT8_TOLERANCE[case.dtype]
    elif config.get("fp8", 0):
        ref, tol = cases.fp8_model(built.module, x), cases.FP8_TOLERANCE[case.dtype]
    else:
        ref, tol = cases.reference(built.module, x), cases.TOLERANCE[case.dtype]
    err = cases.rel_error(y, ref)
    if err > tol:
        raise WrongResult(f"relative error {err:.3g} > {tol}")
    return time_kernel(kern, m, case, replays=max(5, repeats // 10))


def time_kernel(kern, m: int, case: cases.Case, replays: int = 20, l2_bytes: int = 50 << 20):
    """Time ``kern`` (its ``bench_variant``) at M rows over rotating copies of its weights,
    together at least 4x the L2 size (at most 16 copies)."""
    import torch

    dt = torch.float16 if case.dtype == "f16" else torch.bfloat16
    x = torch.randn(m, case.k, device="cuda", dtype=dt)
    y = torch.empty(m, case.n, device="cuda", dtype=dt)
    w_bytes = kern_bytes(kern)
    copies = max(1, min(16, -(-4 * l2_bytes // max(w_bytes, 1))))
    sets = [dict(kern.dev)]
    for _ in range(copies - 1):
        d = dict(kern.dev)
        for role in ("w", "scales", "zeros"):
            if d[role] is not None:
                d[role] = kern.rt.upload(kern.host[role])
        sets.append(d)
    kern.ensure_workspace(m)
    base = dict(kern.dev)

    def launch(i):
        kern.dev = sets[i]
        # The current stream is the capture stream while the graph is recorded.
        kern.run_device(x.data_ptr(), y.data_ptr(), m, torch.cuda.current_stream().cuda_stream,
                        kern.bench_variant)

    try:
        return time_graph(launch, copies, replays=replays)
    finally:
        kern.dev = base
        for d in sets[1:]:
            for role in ("w", "scales", "zeros"):
                if d[role] is not None:
                    kern.rt.free(d[role])


def kern_bytes(kern) -> int:
    return sum(kern.sizes[r] for r in ("w", "scales", "zeros") if kern.dev.get(r) is not None)


def case_from_key(key: dict) -> cases.Case:
    """The random test case of a tuning key (its scheme parsed back from ``w_scheme``)."""
    from qcompiler.tuning.key import scheme_of

    s = scheme_of(key)
    return cases.Case(k=key["k"], n=key["n"], bits=s.dtype.bits, signed=s.dtype.kind == "int",
                      fp8=s.dtype.name == "f8e4m3fn",
                      zero_point=s.zero_point_type is not None,
                      group=s.block_size if s.granularity == "group" else 0,
                      act_order=bool(key.get("act_order")), dtype=key["x_dtype"],
                      bias=bool(key.get("has_bias")),
                      accuracy_level=int(key.get("accuracy_level", 0)))
