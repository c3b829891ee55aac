"""The FPGA HLS backend: Vitis HLS C++ for a chain of quantized layers, and its C simulation.

Stages: QIR with decided ``config`` (hls-fixed-point, hls-parallelism) → ``LayerData`` (exact
integer codes, ``numerics.py``) → C++ sources, test bench, ``hls_config.cfg`` and Tcl from the
templates → C simulation with g++ and the ap_types headers of the installed ``hls4ml`` package.
Templates receive decided values only; emitting and building are separate steps.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import weakref

import jinja2
import numpy as np

import qcompiler.version
from qcompiler.codegen import Backend
from qcompiler.codegen.hls import cost_model
from qcompiler.codegen.hls.config import check_parallelism
from qcompiler.codegen.hls.config import validate as validate_config
from qcompiler.codegen.hls.design import design_layers
from qcompiler.codegen.hls.numerics import LayerData, prepare_layer, prepare_run_input, simulate
from qcompiler.codegen.names import safe_identifier
from qcompiler.errors import ArtifactError, QCompilerError

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
TB_ROWS = 4  # rows of test data written for the vendor flow's csim/cosim
CXXFLAGS = ["-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-label",
            "-Wno-uninitialized", "-Wno-maybe-uninitialized"]


class HLSError(QCompilerError, RuntimeError):
    """The design cannot be emitted or simulated; the message says what is missing."""


def find_ap_types() -> str:
    """The Xilinx ap_types headers shipped inside the hls4ml package (never copied here)."""
    try:
        import hls4ml  # noqa: F401  (only its data files are used)
    except ImportError:
        raise HLSError("the C simulation needs the ap_types headers of the hls4ml package: "
                       "pip install 'qcompiler[hls]' (hls4ml==1.3.0)") from None
    path = os.path.join(os.path.dirname(hls4ml.__file__), "templates", "vivado", "ap_types")
    if not os.path.exists(os.path.join(path, "ap_fixed.h")):
        raise HLSError(f"hls4ml is installed but {path}/ap_fixed.h is missing")
    return path


def top_name(module) -> str:
    """``qc_<module name>``: a C identifier, file name and Tcl word for any module name (see
    ``codegen.names.safe_identifier``: sanitized, with a hash when that changed the name)."""
    return safe_identifier("qc_", module.name)


def design(module) -> list[LayerData]:
    layers = []
    for i, (node, _relu) in enumerate(design_layers(module)):
        cfg = node.attrs.get("config", {})
        missing = [k for k in ("x_width", "pe", "simd") if k not in cfg]
        if missing:
            raise HLSError(f"%{node.result.name}: config lacks {missing}; the pipeline must run "
                           "hls-fixed-point and hls-parallelism")
        validate_config(cfg, node)  # whatever its source: passes, tuning log or .qir text
        layers.append(prepare_layer(module, node, f"layer{i}"))
    for a, b in zip(layers, layers[1:]):
        if (a.cfg["y_width"], a.cfg["y_int"]) != (b.cfg["x_width"], b.cfg["x_int"]):
            raise HLSError(f"{a.name} output and {b.name} input formats differ")
    return layers


def _rows(values, per_line: int = 8, fmt=str) -> list[str]:
    items = [fmt(v) for v in values]
    return [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]


def render(layers: list[LayerData], top: str, target) -> dict[str, str]:
    """File name → source text. Deterministic: same design, same bytes."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    views = []
    for l in layers:
        views.append({
            "name": l.name, "cfg": l.cfg, "inv_perm": l.inv_perm,
            "words_hex": [", ".join(f"0x{int(w):08x}" for w in row) for row in l.words],
            "scale_rows": [", ".join(str(int(v)) for v in row) for row in l.scale_raw],
            "zp_rows": [", ".join(str(int(v)) for v in row) for row in l.zp],
            "bias_list": ", ".join(f"{int(v)}" for v in l.bias_raw),
            "inv_perm_list": "" if l.inv_perm is None else ", ".join(str(int(v)) for v in l.inv_perm),
        })
    ctx = {"layers": views, "top": top, "version": qcompiler.version.__version__,
           "target": target.name, "part": target.params["part"],
           "clock_mhz": target.params["clock_mhz"],
           "period_ns": round(1000.0 / target.params["clock_mhz"], 3), "rows": TB_ROWS}
    files = {f"{top}.h": "kernel.h.j2", f"{top}.cpp": "kernel.cpp.j2",
             f"{top}_weights.h": "weights.h.j2", f"{top}_tb.cpp": "tb.cpp.j2",
             "hls_config.cfg": "hls_config.cfg.j2", "run_hls.tcl": "run_hls.tcl.j2"}
    return {name: env.get_template(tpl).render(**ctx) for name, tpl in files.items()}


def build_csim(kernels_dir: str, top: str, extra_flags: tuple = ()) -> str:
    """Compile the C simulation; returns the executable's path (rebuilt when sources change)."""
    exe = os.path.join(kernels_dir, "build", f"{top}_csim" + "".join(
        f.replace("-", "_").replace("=", "_") for f in extra_flags))
    sources = [os.path.join(kernels_dir, f"{top}.cpp"), os.path.join(kernels_dir, f"{top}_tb.cpp")]
    newest = max(os.path.getmtime(p) for p in sources + [
        os.path.join(kernels_dir, f"{top}.h"), os.path.join(kernels_dir, f"{top}_weights.h")])
    if os.path.exists(exe) and os.path.getmtime(exe) >= newest:
        return exe
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    cmd = ["g++", *CXXFLAGS, *extra_flags, "-isystem", find_ap_types(), "-I", kernels_dir,
           *sources, "-o", exe]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise HLSError(f"g++ failed building the C simulation:\n{' '.join(cmd)}\n{proc.stderr}")
    return exe


def run_csim(exe: str, x: np.ndarray, expected: np.ndarray = None) -> np.ndarray:
    """Run the C simulation on rows ``x [M, K]``; returns float64 outputs [M, N]."""
    x = np.ascontiguousarray(x, np.float32)
    with tempfile.TemporaryDirectory(prefix="qc_csim_") as tmp:
        xin, yout = os.path.join(tmp, "x.bin"), os.path.join(tmp, "y.bin")
        x.tofile(xin)
        args = [exe, xin, str(x.shape[0]), yout]
        if expected is not None:
            exp = os.path.join(tmp, "expected.bin")
            np.ascontiguousarray(expected, np.float64).tofile(exp)
            args.append(exp)
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode:
            raise HLSError(f"C simulation failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return np.fromfile(yout, np.float64).reshape(x.shape[0], -1)


def cnn_layers(module):
    """The CNN design of ``module`` (``cnn.cnn_design``) with every conv's pe/simd checked."""
    from qcompiler.codegen.hls.cnn import cnn_design
    from qcompiler.errors import ConfigError

    layers, streams, _, _ = cnn_design(module)
    for l in layers:
        if l.kind != "conv":
            continue
        cfg = l.node.attrs.get("config") or {}
        if "pe" not in cfg:
            raise HLSError(f"%{l.node.result.name}: config lacks pe/simd; the pipeline must run "
                           "hls-parallelism")
        problem = check_parallelism(l.cfg, cfg["pe"], cfg["simd"])
        if problem:
            raise ConfigError(f"%{l.node.result.name}: {problem}")
    return layers, streams


def render_cnn(layers, streams, top: str, target) -> dict[str, str]:
    """File name -> source text of a CNN design (deterministic)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    views = []
    for l in layers:
        v = {"name": l.name, "kind": l.kind, "cfg": l.cfg, "inputs": l.inputs,
             "outputs": l.outputs}
        if l.kind == "conv":
            d = l.data
            v.update({
                "w_rows": [", ".join(str(int(x)) for x in row) for row in d["w"]],
                "bias": ", ".join(str(int(x)) for x in d["bias"]),
                "mult": ", ".join(str(int(x)) for x in d["mult"]),
                "shift": ", ".join(str(int(x)) for x in d["shift"]),
                "frac": ", ".join(str(int(x)) for x in d.get("frac", [])),
            })
        if l.kind == "pool" and "count" in l.data:
            v["count_rows"] = [", ".join(str(int(x)) for x in row) for row in l.data["count"]]
        views.append(v)
    internal = [s for name, s in streams.items() if name not in ("x_in", "y_out")]
    ctx = {"layers": views, "streams": streams, "internal_streams": internal, "top": top,
           "version": qcompiler.version.__version__, "target": target.name,
           "part": target.params["part"], "clock_mhz": target.params["clock_mhz"],
           "period_ns": round(1000.0 / target.params["clock_mhz"], 3), "rows": TB_ROWS}
    files = {f"{top}.h": "cnn_kernel.h.j2", f"{top}.cpp": "cnn_kernel.cpp.j2",
             f"{top}_weights.h": "cnn_weights.h.j2", f"{top}_tb.cpp": "cnn_tb.cpp.j2",
             "hls_config.cfg": "hls_config.cfg.j2", "run_hls.tcl": "run_hls.tcl.j2"}
    return {name: env.get_template(tpl).render(**ctx) for name, tpl in files.items()}


def _compile_cnn(module, target, kdir: str) -> list[dict]:
    from qcompiler.codegen.hls.cnn import simulate_cnn

    layers, streams = cnn_layers(module)
    top = top_name(module)
    for name, text in render_cnn(layers, streams, top, target).items():
        with open(os.path.join(kdir, name), "w") as f:
            f.write(text)
    # Test data for the vendor flow: fixed-seed input codes and the bit-accurate outputs.
    rng = np.random.default_rng(0)
    xs = streams["x_in"]
    lo, hi = (-128, 127) if xs.signed else (0, 255)
    x = rng.integers(lo, hi + 1, (TB_ROWS, xs.size))
    x.astype(np.float32).tofile(os.path.join(kdir, "tb_data", "inputs.bin"))
    np.stack([simulate_cnn(layers, row) for row in x]).astype(np.float64).tofile(
        os.path.join(kdir, "tb_data", "expected.bin"))
    est = cost_model.estimate_design([(l.cfg, l.cfg["pe"], l.cfg["simd"]) for l in layers])
    return [{
        "op": "hls_design", "top": top, "impl": "vitis-hls", "part": target.params["part"],
        "clock_mhz": target.params["clock_mhz"], "kind": "cnn",
        "sources": sorted(f for f in os.listdir(kdir) if f.endswith((".cpp", ".h"))),
        "layers": [{"name": l.name, "kind": l.kind, "config": l.cfg} for l in layers],
        "estimate": est,
    }]


def cnn_run_input(module, inputs) -> np.ndarray:
    """The CNN design's checked input codes [N, C, H, W] (InputError naming the input)."""
    from qcompiler.errors import InputError

    arg = module.main.args[0]
    if not isinstance(inputs, dict) or set(inputs) != {arg.name}:
        got = sorted(map(str, inputs)) if isinstance(inputs, dict) else type(inputs).__name__
        raise InputError(f"the design takes one input {arg.name!r}, got {got}")
    x = np.asarray(inputs[arg.name])
    want = arg.type.dtype.np_dtype
    if x.dtype != want:
        raise InputError(f"input {arg.name!r}: dtype {x.dtype}; the design takes {want} codes")
    shape = list(arg.type.shape)
    if x.ndim != 4 or list(x.shape[1:]) != shape[1:] or x.shape[0] < 1:
        raise InputError(f"input {arg.name!r}: shape {list(x.shape)}; the design takes {shape}")
    return x


class HLSBackend(Backend):
    name = "hls"

    def compile(self, module, target, out_dir: str, builder=None) -> list[dict]:
        # Nothing is built here (``builder`` is unused): the runner builds the C simulation
        # from the verified sources on its first run.
        from qcompiler.codegen.hls.cnn import is_cnn_design

        if is_cnn_design(module):
            kdir = os.path.join(out_dir, "kernels")
            os.makedirs(os.path.join(kdir, "tb_data"), exist_ok=True)
            return _compile_cnn(module, target, kdir)
        layers = design(module)
        top = top_name(module)
        kdir = os.path.join(out_dir, "kernels")
        os.makedirs(os.path.join(kdir, "tb_data"), exist_ok=True)
        for name, text in render(layers, top, target).items():
            with open(os.path.join(kdir, name), "w") as f:
                f.write(text)
        # Test data for the vendor flow: fixed-seed inputs and the bit-accurate outputs.
        rng = np.random.default_rng(0)
        x = rng.standard_normal((TB_ROWS, layers[0].cfg["k"])).astype(np.float32)
        x.tofile(os.path.join(kdir, "tb_data", "inputs.bin"))
        simulate(layers, x).tofile(os.path.join(kdir, "tb_data", "expected.bin"))
        est = cost_model.estimate_design([(l.cfg, l.cfg["pe"], l.cfg["simd"]) for l in layers])
        return [{
            "op": "hls_design", "top": top, "impl": "vitis-hls", "part": target.params["part"],
            "clock_mhz": target.params["clock_mhz"],
            "sources": sorted(f for f in os.listdir(kdir) if f.endswith((".cpp", ".h"))),
            "layers": [{"name": l.name, "config": l.cfg} for l in layers],
            "estimate": est,
        }]

    def runner(self, module, manifest: dict, out_dir: str):
        from qcompiler.driver.artifact import KERNELS_DIR, read_verified_bytes

        designs = [(i, r) for i, r in enumerate(manifest["kernels"]) if r["op"] == "hls_design"]
        if len(designs) != 1:
            raise ArtifactError(f"manifest.json: 'kernels' holds {len(designs)} hls_design "
                                "records; an FPGA artifact has one")
        index, record = designs[0]
        top = record["top"]
        # The top-level name becomes file names and g++ arguments: a C identifier only.
        if not isinstance(top, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", top):
            raise ArtifactError(f"manifest.json: kernels[{index}].top = {top!r} is not a C "
                                "identifier")
        sources = [f"{top}.cpp", f"{top}_tb.cpp", f"{top}.h", f"{top}_weights.h"]
        # Read and checked now (inside the artifact, listed, sha256); the build uses these bytes.
        source_bytes = {name: read_verified_bytes(out_dir, manifest, name,
                                                  f"kernels[{index}] source", under=KERNELS_DIR)
                        for name in sources}
        fn = module.main
        out_name = fn.output_names[0]
        out_dtype = fn.outputs[0].type.dtype.np_dtype
        exe_cache: list[str] = []

        def build() -> str:
            # The simulation is built from the verified bytes in a private directory: nothing
            # from the artifact directory runs unless the manifest lists and hashes it (a
            # prebuilt executable planted beside the sources would not be).
            build_dir = tempfile.mkdtemp(prefix=f"qc_csim_{top}_")
            weakref.finalize(run, shutil.rmtree, build_dir, True)
            for name, data in source_bytes.items():
                with open(os.path.join(build_dir, name), "wb") as f:
                    f.write(data)
            return build_csim(build_dir, top)

        def run_cnn(inputs: dict) -> dict:
            x = cnn_run_input(module, inputs)
            if not exe_cache:
                exe_cache.append(build())
            hwc = x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1).astype(np.float32)
            y = run_csim(exe_cache[0], hwc)
            oshape = fn.outputs[0].type.shape
            y = y.reshape(x.shape[0], oshape[2], oshape[3], oshape[1]).transpose(0, 3, 1, 2)
            return {out_name: np.ascontiguousarray(y).astype(out_dtype)}

        def run(inputs: dict) -> dict:
            if record.get("kind") == "cnn":
                return run_cnn(inputs)
            # Checked inputs (InputError naming the input); saturation counted and reported.
            x, module.last_run_stats = prepare_run_input(module, inputs)
            if not exe_cache:
                exe_cache.append(build())
            rows = x.reshape(-1, x.shape[-1])
            y = run_csim(exe_cache[0], rows)
            return {out_name: y.reshape(*x.shape[:-1], -1).astype(out_dtype)}

        return run
