"""The artifact a compile writes (DESIGN.md, "Artifacts and runtime").

    DIR/module.qir           the final IR, text
    DIR/weights.safetensors  the constant side table (packed/reordered weights)
    DIR/kernels/             every generated source file, and the built library
    DIR/manifest.json        inputs, outputs, kernel calls in order, shapes and configs
    DIR/report.json          what each pass did, the chosen configs, estimates
    DIR/report.txt           the same, for people
"""
from __future__ import annotations

import json
import os
import numpy as np

from qcompiler.ir import Module, parse_module, print_module
from qcompiler.ir.types import ELEMENT_TYPES

MODULE_FILE = "module.qir"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
REPORT_TEXT = "report.txt"
KERNELS_DIR = "kernels"

# safetensors' numpy API knows the standard dtypes only; ml_dtypes arrays (bf16, fp8, fp4)
# are stored as unsigned integers of the same width and viewed back on load.
_RAW_VIEW = {1: np.uint8, 2: np.uint16}


def write_weights(path: str, constants: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tensors, dtypes = {}, {}
    for name, arr in constants.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.kind not in "biuf" or arr.dtype.name not in np.sctypeDict:
            dtypes[name] = arr.dtype.name
            arr = arr.view(_RAW_VIEW[arr.dtype.itemsize])
        tensors[name] = arr
    save_file(tensors, path, metadata={"ml_dtypes": json.dumps(dtypes, sort_keys=True)})


def read_weights(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        raw = json.loads((f.metadata() or {}).get("ml_dtypes", "{}"))
        for name in f.keys():
            arr = f.get_tensor(name)
            if name in raw:
                storage = next(t.np_dtype for t in ELEMENT_TYPES.values()
                               if t.np_dtype.name == raw[name])
                arr = arr.view(storage)
            out[name] = arr
    return out


def describe_value(v) -> dict:
    return {"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype.name}


def write_artifact(out_dir: str, module: Module, manifest: dict, report: dict,
                   report_text: str) -> None:
    os.makedirs(os.path.join(out_dir, KERNELS_DIR), exist_ok=True)
    with open(os.path.join(out_dir, MODULE_FILE), "w") as f:
        f.write(print_module(module))
    write_weights(os.path.join(out_dir, WEIGHTS_FILE), module.constants)
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_TEXT), "w") as f:
        f.write(report_text)


def read_artifact(out_dir: str) -> tuple[Module, dict]:
    """The module (with its weights) and the manifest of an artifact directory."""
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"{out_dir}: not a qcompiler artifact (no {MANIFEST_FILE})")
    with open(manifest_path) as f:
        manifest = json.load(f)
    weights = read_weights(os.path.join(out_dir, WEIGHTS_FILE))
    with open(os.path.join(out_dir, MODULE_FILE)) as f:
        module = parse_module(f.read(), weights)
    return module, manifest

