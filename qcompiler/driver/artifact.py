"""The artifact a compile writes (docs/artifact.md).

    DIR/module.qir           the final IR, text
    DIR/weights.safetensors  the constant side table (packed/reordered weights)
    DIR/kernels/             every generated source file, and the built library
    DIR/manifest.json        inputs, outputs, kernel calls in order, shapes and configs
    DIR/report.json          what each pass did, the chosen configs, estimates
    DIR/report.txt           the same, for people

An artifact is code, so ``read_artifact`` trusts nothing in it before checking it:

- ``manifest["format"] = {"name": "qcompiler-artifact", "version": 1}``: the layout of this
  directory and of the manifest; another name or a version this qcompiler does not read is
  refused (``FORMAT_VERSION``; raise it when the layout changes incompatibly).
- ``manifest["files"] = {relative path: sha256 hex}``: every file the compile wrote (module.qir,
  weights.safetensors, kernels/**) except manifest.json and the reports. All are verified before
  anything is parsed, dlopened or executed; a backend's runner opens only files listed there,
  through ``artifact_path`` (no absolute paths, no ``..``, nothing resolving outside DIR).
- the manifest's structure is validated in one place (``validate_manifest``), and the weights
  against the types module.qir declares for them (shape, dtype, codes within their range).

Every failure is an ``ArtifactError`` naming the file or the manifest key.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from qcompiler.errors import ArtifactError, QCompilerError
from qcompiler.ir import Module, parse_module, print_module
from qcompiler.ir.types import ELEMENT_TYPES

MODULE_FILE = "module.qir"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
REPORT_TEXT = "report.txt"
KERNELS_DIR = "kernels"

FORMAT_NAME = "qcompiler-artifact"
FORMAT_VERSION = 1
# Written by the compile but not covered by the hashes: the manifest holds them, and the
# reports are for people (nothing loads them).
UNHASHED_FILES = (MANIFEST_FILE, REPORT_FILE, REPORT_TEXT)

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


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_files(out_dir: str) -> dict[str, str]:
    """{relative path ("/"-separated): sha256} of every file the compile wrote into out_dir."""
    files = {}
    for name in (MODULE_FILE, WEIGHTS_FILE):
        files[name] = file_sha256(os.path.join(out_dir, name))
    kdir = os.path.join(out_dir, KERNELS_DIR)
    for root, dirs, names in os.walk(kdir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            if os.path.isfile(path):
                rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
                files[rel] = file_sha256(path)
    return files


def write_artifact(out_dir: str, module: Module, manifest: dict, report: dict,
                   report_text: str) -> None:
    """Write the artifact; the manifest gets the format version first and the hashes of every
    other file last (so the kernels must already be in out_dir/kernels)."""
    os.makedirs(os.path.join(out_dir, KERNELS_DIR), exist_ok=True)
    with open(os.path.join(out_dir, MODULE_FILE), "w") as f:
        f.write(print_module(module))
    write_weights(os.path.join(out_dir, WEIGHTS_FILE), module.constants)
    manifest = {"format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
                **{k: v for k, v in manifest.items() if k not in ("format", "files")},
                "files": artifact_files(out_dir)}
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_TEXT), "w") as f:
        f.write(report_text)


# --------------------------------------------------------------------------------------------
# reading: paths, manifest structure, integrity, weights
# --------------------------------------------------------------------------------------------


def _is_inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def checked_relpath(relpath, what: str) -> str:
    """``relpath`` if it is a plain relative "/"-separated path (no absolute path, no ``..``,
    ``.`` or empty component, no backslash or NUL); ArtifactError naming ``what`` otherwise."""
    if not isinstance(relpath, str) or not relpath:
        raise ArtifactError(f"manifest.json: {what} must be a non-empty relative path, got "
                            f"{relpath!r}")
    if relpath.startswith("/") or os.path.isabs(relpath):
        raise ArtifactError(f"manifest.json: {what} = {relpath!r} is an absolute path; an "
                            "artifact names only files inside its directory")
    parts = relpath.split("/")
    if ".." in parts:
        raise ArtifactError(f"manifest.json: {what} = {relpath!r} leads out of the artifact "
                            "directory ('..')")
    if "\\" in relpath or "\0" in relpath or any(p in ("", ".") for p in parts):
        raise ArtifactError(f"manifest.json: {what} = {relpath!r} is not a plain relative path")
    return relpath


def artifact_path(out_dir: str, manifest: dict, relpath, what: str, under: str = "") -> str:
    """The real path of a file the manifest names, after checking that it lies inside out_dir.

    ``relpath`` is relative to ``out_dir/under`` (e.g. ``under="kernels"``). Refused with an
    ArtifactError naming ``what`` (the manifest key): absolute paths, ``..``, a path whose
    real location (symlinks resolved, parents included) is outside out_dir, and a file not
    listed in ``manifest["files"]`` (only listed files were verified by ``read_artifact``).
    Call it for every file name read from a manifest, before opening, loading or running it.
    """
    relpath = checked_relpath(relpath, what)
    if under:
        relpath = checked_relpath(under, "directory") + "/" + relpath
    root = os.path.realpath(out_dir)
    real = os.path.realpath(os.path.join(root, *relpath.split("/")))
    if not _is_inside(root, real):
        raise ArtifactError(f"manifest.json: {what} = {relpath!r} resolves to {real}, outside "
                            f"the artifact directory {root} (a symlink leads out)")
    if relpath not in manifest.get("files", {}):
        raise ArtifactError(f"manifest.json: {what} = {relpath!r} is not among the artifact's "
                            "verified files ('files')")
    return real


def read_verified_bytes(out_dir: str, manifest: dict, relpath: str, what: str,
                        under: str = "") -> bytes:
    """The bytes of a listed file, checked against its sha256 again as they are read (for
    files copied or compiled after load, so that a change since load is noticed)."""
    path = artifact_path(out_dir, manifest, relpath, what, under)
    key = f"{under}/{relpath}" if under else relpath
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ArtifactError(f"{key}: cannot be read ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != manifest["files"][key]:
        raise ArtifactError(f"{key} was changed after the compile (sha256 differs from the "
                            "manifest)")
    return data


_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHAPE_DIM = (int, str)


def _get(obj: dict, key: str, types, where: str):
    """obj[key] checked to be of ``types``; ArtifactError naming the key otherwise."""
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise ArtifactError(f"manifest.json: missing key {name!r}")
    value = obj[key]
    types = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python, not in JSON: True is no format version
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        want = " or ".join(t.__name__ for t in types)
        raise ArtifactError(f"manifest.json: key {name!r} must be {want}, got "
                            f"{type(value).__name__}")
    return value


def _check_values(values, where: str) -> None:
    for i, v in enumerate(values):
        at = f"{where}[{i}]"
        if not isinstance(v, dict):
            raise ArtifactError(f"manifest.json: {at} must be an object")
        _get(v, "name", str, at)
        _get(v, "dtype", str, at)
        for d in _get(v, "shape", list, at):
            if isinstance(d, bool) or not isinstance(d, _SHAPE_DIM):
                raise ArtifactError(f"manifest.json: {at}.shape holds {d!r}, not a dimension")


# Keys a backend's runner reads from a kernel record, by the record's "impl" (records of other
# impls, e.g. "reference", are only listed).
_KERNEL_KEYS = {
    "tvm-llvm": {"result": str, "library": str},
    "cuda": {"result": str, "symbol": str, "library": str, "built": bool},
    "vitis-hls": {"top": str, "sources": list},
}


def validate_manifest(manifest) -> dict:
    """Check the structure every loader relies on; returns the manifest. ArtifactError names
    the first missing or mistyped key (never a KeyError/TypeError later)."""
    if not isinstance(manifest, dict):
        raise ArtifactError("manifest.json: must hold a JSON object")
    fmt = manifest.get("format")
    if fmt is None:
        raise ArtifactError("manifest.json: no format version (key 'format'): not a qcompiler "
                            "artifact, or written by a qcompiler before format versions; "
                            "compile the model again")
    if not isinstance(fmt, dict):
        raise ArtifactError("manifest.json: key 'format' must be object")
    name = _get(fmt, "name", str, "format")
    if name != FORMAT_NAME:
        raise ArtifactError(f"manifest.json: format {name!r} is not {FORMAT_NAME!r}")
    version = _get(fmt, "version", int, "format")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"manifest.json: format version {version} was written by a newer "
                            f"qcompiler; this qcompiler reads version {FORMAT_VERSION} (upgrade "
                            "qcompiler or compile the model again)")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"manifest.json: unknown format version {version}; this qcompiler "
                            f"reads version {FORMAT_VERSION}")
    for key in ("qcompiler", "target", "backend", "pipeline"):
        _get(manifest, key, str, "")
    _check_values(_get(manifest, "inputs", list, ""), "inputs")
    _check_values(_get(manifest, "outputs", list, ""), "outputs")
    for i, rec in enumerate(_get(manifest, "kernels", list, "")):
        at = f"kernels[{i}]"
        if not isinstance(rec, dict):
            raise ArtifactError(f"manifest.json: {at} must be an object")
        _get(rec, "op", str, at)
        impl = _get(rec, "impl", str, at)
        for key, types in _KERNEL_KEYS.get(impl, {}).items():
            _get(rec, key, types, at)
    files = _get(manifest, "files", dict, "")
    for required in (MODULE_FILE, WEIGHTS_FILE):
        if required not in files:
            raise ArtifactError(f"manifest.json: key 'files' does not list {required}")
    for rel, digest in files.items():
        checked_relpath(rel, f"files[{rel!r}]")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ArtifactError(f"manifest.json: files[{rel!r}] must be a sha256 hex digest")
    return manifest


def read_manifest(out_dir: str) -> dict:
    """The validated manifest of an artifact directory."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ArtifactError(f"{out_dir}: not a qcompiler artifact (no {MANIFEST_FILE})")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{MANIFEST_FILE}: not valid JSON ({e})") from None
    return validate_manifest(manifest)


def verify_files(out_dir: str, manifest: dict) -> None:
    """Every file listed in the manifest is inside out_dir and has its recorded sha256."""
    for rel, digest in manifest["files"].items():
        path = artifact_path(out_dir, manifest, rel, f"files[{rel!r}]")
        if not os.path.isfile(path):
            raise ArtifactError(f"{rel}: missing from the artifact directory {out_dir}")
        if file_sha256(path) != digest:
            raise ArtifactError(f"{rel} was changed after the compile (sha256 differs from the "
                                "manifest)")


def check_weights(module: Module) -> None:
    """Each side-table constant has the shape and storage dtype module.qir declares for it, and
    integer codes lie within their element type's range (e.g. 0..15 for u4)."""
    for fn in module.functions:
        for node in fn.nodes:
            if node.op != "constant" or "name" not in node.attrs:
                continue
            name, t = node.attrs["name"], node.result.type
            arr = module.constants.get(name)
            if arr is None:
                raise ArtifactError(f"{WEIGHTS_FILE}: tensor {name!r} is missing")
            if arr.dtype != t.dtype.np_dtype:
                raise ArtifactError(f"{WEIGHTS_FILE}: tensor {name!r} is {arr.dtype}; module.qir "
                                    f"declares {t.dtype.name} ({t.dtype.np_dtype})")
            if t.is_static and tuple(arr.shape) != tuple(t.shape):
                raise ArtifactError(f"{WEIGHTS_FILE}: tensor {name!r} has shape "
                                    f"{list(arr.shape)}; module.qir declares {list(t.shape)}")
            et = t.dtype
            narrow = et.kind in ("nf4", "ternary") or (
                et.is_integer and et.bits < 8 * arr.dtype.itemsize)
            if narrow and arr.size:
                lo, hi = et.int_range()
                amin, amax = int(arr.min()), int(arr.max())
                if amin < lo or amax > hi:
                    raise ArtifactError(
                        f"{WEIGHTS_FILE}: tensor {name!r} holds codes in [{amin}, {amax}], "
                        f"outside the range of {et.name} [{lo}, {hi}]")


def read_artifact(out_dir: str) -> tuple[Module, dict]:
    """The module (with its weights) and the manifest of an artifact directory, after checking
    the manifest, every listed file's hash and the weights (see the module docstring)."""
    out_dir = os.fspath(out_dir)
    manifest = read_manifest(out_dir)
    verify_files(out_dir, manifest)
    try:
        weights = read_weights(artifact_path(out_dir, manifest, WEIGHTS_FILE, "weights"))
    except ArtifactError:
        raise
    except Exception as e:  # safetensors' own errors are not ours: name the file
        raise ArtifactError(f"{WEIGHTS_FILE}: unreadable ({type(e).__name__}: {e})") from None
    try:
        with open(artifact_path(out_dir, manifest, MODULE_FILE, "module"),
                  encoding="utf-8") as f:
            module = parse_module(f.read(), weights)
    except (QCompilerError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{MODULE_FILE}: {e}") from None
    check_weights(module)
    return module, manifest
