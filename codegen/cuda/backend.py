"""The CUDA backend: one generated .cu per qmatmul (jinja2), nvcc, a shared library each.

Stages: QIR after ``reorder-weights,schedule-unpack,tile`` (every decision is in the weight's
layout and the node's ``config``) -> ``kernel_params`` (plain values) -> CUDA C++ from
``templates/qmatmul.cu.j2`` (the decided constants and the kernel instances; the kernels
themselves are the static headers in ``include/qcompiler/``) -> ``nvcc`` (``build.py``) ->
``kernels/<symbol>.so`` with a C ABI -> ``runtime.py`` (ctypes). Without nvcc the sources are
still written; without a GPU the libraries are built but not run.
"""
from __future__ import annotations

import os

import jinja2

import qcompiler.version
from qcompiler.codegen import Backend
from qcompiler.codegen.cuda import build as nv
from qcompiler.codegen.cuda.config import validate as validate_config
from qcompiler.codegen.cuda.epilogue import epilogue_params
from qcompiler.codegen.cuda.layout import LAYOUT_NAME
from qcompiler.codegen.names import safe_identifier
from qcompiler.errors import InputError
from qcompiler.targets import get_target

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def device_plan_enabled() -> bool:
    """Whether CUDA artifacts build and run the device plan (every op a CUDA kernel, one CUDA
    graph per input signature; codegen/cuda/plan.py): the default since it passed the GPU
    tests and the whole-model checks on an H200 (2026-12-03). ``QC_CUDA_PLAN=0`` turns it off:
    non-qmatmul ops then run on the host beside the qmatmul kernels (the earlier path)."""
    return os.environ.get("QC_CUDA_PLAN", "1") != "0"


class CudaCodegenError(InputError):
    """The module is not ready for CUDA code generation; the message names the node."""


# The symbol the sources are rendered with to take their key (the real one names the key).
SHARED_SYMBOL = "qc_qmm"


def kernel_symbol(node) -> str:
    """``qc_qmm_<name>``, a C identifier and file name for any value name: characters outside
    ``[A-Za-z0-9_]`` become ``_`` and then a hash of the name keeps two names apart that map
    to the same text (``a.b`` and ``a_b``); long names are cut, with the hash."""
    return safe_identifier("qc_qmm_", node.result.name)


def comment_text(text: str) -> str:
    """``text`` safe inside a ``//`` comment: printable ASCII only (anything else is escaped,
    so a newline cannot end the comment), and no trailing backslash (a line splice)."""
    out = "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
                  for c in str(text))
    return out + " " if out.endswith("\\") else out


def _commented(epilogue: dict | None) -> dict | None:
    """The epilogue's body text made safe for the source's ``//`` comment."""
    return epilogue and {**epilogue, "text": comment_text(epilogue["text"])}


def kernel_params(node, target_name: str) -> dict:
    """Every value the template needs, from the node's layout and config (nothing decided here)."""
    w_t = node.arg("w").type
    lay = w_t.layout
    cfg = node.attrs.get("config", {})
    if lay is None or lay.name != LAYOUT_NAME or "variants" not in cfg:
        raise CudaCodegenError(
            f"%{node.result.name}: not packed and tiled for CUDA; the pipeline must end with "
            "reorder-weights,schedule-unpack,tile")
    dtype = node.operands[0].type.dtype.name
    variants = []
    for i, v in enumerate(sorted(cfg["variants"].values(), key=lambda v: v["m_max"])):
        variants.append({**v, "wgmma": v.get("wgmma", 0), "int8": v.get("int8", 0),
                         "fp8": v.get("fp8", 0), "name": f"v{i}"})
    # One template instance per distinct kernel (split_k is a run-time value).
    instances = sorted({(v["gemv"], v["m_frags"], v["warps_n"], v["warps_k"], v["stages"])
                        + ((0, v["acc_scale"], 0, 0) if v["gemv"]
                           else (v["stage_k"], v["acc_scale"], v["int8"], v["fp8"]))
                        for v in variants if not v["wgmma"]})
    wgmma_instances = sorted({(v["wgmma"], v["m_frags"], v["warps_n"], v["warps_k"], v["stages"],
                               v["int8"], v["fp8"]) for v in variants if v["wgmma"]})
    k, k_pad = lay.get("k"), lay.get("k_pad")
    return {
        "version": qcompiler.version.__version__, "node_name": comment_text(node.result.name),
        "target": target_name,
        "symbol": kernel_symbol(node), "dtype": dtype,
        "scalar_t": "half" if dtype == "f16" else "__nv_bfloat16",
        "scalar2_t": "half2" if dtype == "f16" else "__nv_bfloat162",
        "mma_type": "f16" if dtype == "f16" else "bf16",
        "w_scheme": comment_text(str(node.attrs["w_scheme"])),
        "layout": comment_text(lay), "cb": lay.get("container_bits"), "k": k, "n": lay.get("n"),
        "k_pad": k_pad, "n_pad": lay.get("n_pad"), "group": lay.get("group"),
        "scale_rows": -(-k_pad // lay.get("group")),
        "scale_at": cfg["scale_at"], "zero_at": cfg["zero_at"], "unpack": cfg["unpack"],
        "has_zp": node.arg("w_zero_point") is not None,
        "zero_const": max(lay.get("zero_const"), 0),
        # x is copied once per call when K is permuted (act-order) or not 16-byte aligned.
        "prep_x": bool(lay.get("act_order")) or k % 8 != 0,
        "variants": variants, "instances": instances, "wgmma_instances": wgmma_instances,
        "epilogue": _commented(epilogue_params(node)),
        "has_gemv": any(c[0] for c in instances),
        "has_int8": any(c[7] or c[8] for c in instances),  # tiled_i8.cuh: int8 or FP8 x
        # wgmma_act8.cuh: the wgmma kernel with int8 or FP8 x
        "has_wgmma_act8": any(c[5] or c[6] for c in wgmma_instances),
        "code_bits": node.attrs["w_scheme"].dtype.bits,
        # Programmatic dependent launch of the GEMV kernel where the target has it (sm_90);
        # QC_CUDA_PDL=0 turns it off (to measure what it gains).
        "pdl": "pdl" in get_target(target_name).features
               and os.environ.get("QC_CUDA_PDL", "1") != "0",
        # and of the wgmma kernels where the tile pass asked for it (tile{wgmma_pdl=1})
        "wgmma_pdl": bool(cfg.get("wgmma_pdl", 0)),
        # fuse-norm-qmatmul: x's rows normalized in the kernel (or its prologue copy)
        **X_NORM_PARAMS[node.attrs.get("x_norm")],
        "x_norm_eps": _float_literal(node.attrs.get("x_norm_epsilon", 0.0)),
        **zero_constants(cfg["unpack"], dtype, max(lay.get("zero_const"), 0)),
    }


# qmatmul's x_norm -> the template's Config::X_NORM (norm.cuh) and its comment's formula
X_NORM_PARAMS = {
    None: {"x_norm_kind": "X_NORM_NONE", "x_norm_text": "x"},
    "rms": {"x_norm_kind": "X_NORM_RMS", "x_norm_text": "rmsnorm(x, norm_w)"},
    "layer": {"x_norm_kind": "X_NORM_LAYER", "x_norm_text": "layernorm(x, norm_w, norm_b)"},
}


def _float_literal(value: float) -> str:
    """A float as a C++ float literal that reads back as the same f32 (e.g. 1e-05f)."""
    import numpy as np

    text = str(np.float32(value))  # the shortest text that reads back as this f32
    return (text if ("e" in text or "." in text) else text + ".0") + "f"


def _bits2(value: float, dtype: str) -> str:
    """A float as the hex bits of a duplicated 16-bit pair (f16 or bf16)."""
    import ml_dtypes
    import numpy as np

    h = np.array(value, np.float16 if dtype == "f16" else ml_dtypes.bfloat16).view(np.uint16)
    return f"0x{int(h):04x}{int(h):04x}"


def zero_constants(unpack: str, dtype: str, zero: int) -> dict:
    """The magic-number offsets of a constant zero point (see the unpack functions)."""
    if unpack == "lop3-magic-f16":
        return {"zlo2": _bits2(1024 + zero, dtype), "zhi2": _bits2(-(64 + zero), dtype),
                "zero_consts_note": f"(1024 + {zero}) and -(64 + {zero}) in fp16"}
    if unpack == "shift-magic-bf16":
        return {"zlo2": _bits2(128 + zero, dtype), "zhi2": "0x00000000",
                "zero_consts_note": f"128 + {zero} in bf16"}
    if unpack == "prmt-f16":
        return {"zlo2": _bits2(1024 + zero, dtype), "zhi2": "0x00000000",
                "zero_consts_note": f"1024 + {zero} in fp16"}
    return {"zlo2": "0x00000000", "zhi2": "0x00000000",
            "zero_consts_note": "unused by the fp32 conversion"}


def render(params: dict) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    # Variants with the wgmma kernel add wgmma.cuh and its instances (built for sm_90a).
    return env.get_template("qmatmul.cu.j2").render(**params)


def target_archs(target, params: dict | None = None) -> list[str]:
    """nvcc's archs: the target's, or sm_90a alone for a kernel with wgmma variants (wgmma and
    setmaxnreg exist only in the arch-specific sm_90a)."""
    if params is not None and params.get("wgmma_instances"):
        return ["sm_90a"]
    return [target.params["arch"]]


def operand_names(node) -> dict:
    """Constant names of the packed operands (in the artifact's weights file)."""
    names = {}
    for role, i in (("w", 1), ("scales", 2), ("zeros", 3), ("perm", 4), ("bias", 7)):
        v = node.operand(i)
        if v is not None:
            names[role] = v.producer.attrs.get("name") if v.producer is not None else None
    return names


class CudaBackend(Backend):
    name = "cuda"

    def compile(self, module, target, out_dir: str, builder=None) -> list[dict]:
        """One .cu and library per distinct kernel: nodes whose sources differ only in their
        names share ``qc_qmm_<key>`` (the key hashes the source rendered without names, the
        nvcc flags and archs, nvcc's version); libraries come from ``builder``'s cache or are
        built in parallel. Without nvcc the sources are written and nothing is built."""
        import functools

        from qcompiler.codegen.build import Builder, KernelBuild, kernel_key

        builder = builder or Builder()
        kdir = os.path.join(out_dir, "kernels")
        os.makedirs(kdir, exist_ok=True)
        archs = target_archs(target)
        flags = " ".join(nv.NVCC_FLAGS + [f for a in archs for f in nv.gencode_flags(a)])
        tool = nv.nvcc_version()
        records = []
        kernels: dict[str, dict] = {}   # key -> {"params", "nodes"}, in first-use order
        for node in module.main.nodes:
            if node.op != "qmatmul":
                continue
            validate_config(node.attrs.get("config"), node, target)  # whatever its source
            params = kernel_params(node, target.name)
            # Names are the only per-node text: the key is taken without them.
            unnamed = render({**params, "symbol": SHARED_SYMBOL, "node_name": ""})
            k_archs = target_archs(target, params)
            k_flags = " ".join(nv.NVCC_FLAGS + [f for a in k_archs for f in nv.gencode_flags(a)])
            key = kernel_key(nv.key_source(unnamed), k_flags, tool)  # with the headers' digest
            kernel = kernels.setdefault(key, {"params": params, "nodes": [], "archs": k_archs})
            kernel["nodes"].append(node.result.name)
            symbol = f"qc_qmm_{key[:12]}"
            records.append({
                "op": "qmatmul", "result": node.result.name, "impl": "cuda",
                "symbol": symbol, "source": symbol + ".cu", "library": symbol + ".so",
                "kernel_key": key, "x": list(node.operands[0].type.shape),
                "w_layout": str(node.arg("w").type.layout),
                "operands": operand_names(node), "config": node.attrs["config"]})
        # The static device code the sources include: the artifact keeps its own copy and its
        # libraries are built from it (kernels/include), so its sources compile where they are.
        include_dir = os.path.join(kdir, "include")
        if kernels:
            nv.copy_headers(kdir)
        builds = []
        for key, kernel in kernels.items():
            symbol = f"qc_qmm_{key[:12]}"
            text = render({**kernel["params"], "symbol": symbol,
                           "node_name": comment_text(", %".join(kernel["nodes"]))})
            src = os.path.join(kdir, symbol + ".cu")
            with open(src, "w") as f:
                f.write(text)
            builds.append(KernelBuild(key, symbol + ".so",
                                      functools.partial(nv.build_library, src,
                                                        kernel["archs"],
                                                        include_dir=include_dir),
                                      kernel["nodes"]))
        rt_src = os.path.join(kdir, "qc_runtime.cu")
        with open(rt_src, "w") as f, open(nv.RUNTIME_SOURCE) as g:
            rt_text = g.read()
            f.write(rt_text)
        builds.append(KernelBuild(kernel_key(rt_text, flags, tool), "qc_runtime.so",
                                  functools.partial(nv.build_library, rt_src, archs), []))
        built = nv.find_nvcc() is not None
        if built:
            builder.build_many(builds, kdir)
        for r in records:
            r["built"] = built
        if built and device_plan_enabled():
            records += self._device_plan(module, target, kdir)
        return records

    @staticmethod
    def _device_plan(module, target, kdir: str) -> list:
        """Every op on the device (codegen/cuda/plan.py): its record. A model with an op the
        CUDA op library lacks keeps the host reference for every op but its qmatmuls: the
        plan record says why, and each of those ops is listed as a host fallback (report.txt,
        manifest) and warned about."""
        import warnings

        from qcompiler.codegen.cuda.ops.common import CudaOpsError
        from qcompiler.codegen.cuda.plan import build_plan

        try:
            return [build_plan(module, target, kdir)]
        except CudaOpsError as e:
            reason = f"no device plan: {e}"
            host = [{"op": n.op, "result": n.results[0].name, "impl": "reference",
                     "host_fallback": True, "reason": reason}
                    for n in module.main.nodes if n.op not in ("constant", "qmatmul")]
            warnings.warn(f"host fallback: {len(host)} ops ({reason})", RuntimeWarning,
                          stacklevel=2)
            return [{"op": "plan", "impl": "cuda-host-ops", "reason": str(e)}] + host

    def runner(self, module, manifest: dict, out_dir: str):
        from qcompiler.codegen.cuda.runtime import CudaModuleRunner

        plan = next((r for r in manifest["kernels"] if r.get("impl") == "cuda-plan"), None)
        if plan is not None and device_plan_enabled():
            from qcompiler.codegen.cuda.plan import CudaPlanRunner

            return CudaPlanRunner(module, manifest, out_dir, plan)
        return CudaModuleRunner(module, manifest, out_dir)
