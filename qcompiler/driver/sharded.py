"""Tensor-parallel compiles (issue #17): the degree from the target, ``shard`` in the pipeline,
and the sharded artifact (docs/artifact.md, "Sharded artifacts").

The degree is a target option: ``--target cpu:tp=2`` (``compile_to_dir(model, "cpu:tp=2")``),
or ``--tp 2`` / ``tp=2`` beside a plain target name; both spell the same thing and must agree
when both are given. With tp > 1 the pipeline gets ``shard{tp=N}`` (``pipeline_with_shard``)
and the compile writes::

    DIR/manifest.json   format qcompiler-sharded-artifact v1: tp, target, backend, pipeline,
                        inputs, outputs, the collective engine, per rank its directory, the
                        sha256 of its manifest.json and its weight bytes, the all_reduce nodes
    DIR/report.json, DIR/report.txt   the degree, per-rank weight bytes, the shard pass's stats
    DIR/rank<r>/        rank r's own single-device artifact (docs/artifact.md), compiled from
                        ``rank_program(module, r)``: its nodes, only its weights

``read_sharded_manifest`` checks the top manifest (format, structure, rank directories inside
DIR, each rank manifest's sha256) before anything of a rank is loaded; each rank's artifact is
then read and verified as any artifact (``read_artifact``) by the process that runs it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from qcompiler.driver.artifact import (MANIFEST_FILE, REPORT_FILE, REPORT_TEXT, _check_values,
                                       _get, checked_relpath, file_sha256)
from qcompiler.errors import ArtifactError, InputError

SHARDED_FORMAT_NAME = "qcompiler-sharded-artifact"
SHARDED_FORMAT_VERSION = 1
# Collective engine per backend: gloo for host memory, NCCL for CUDA devices.
COLLECTIVE_BACKENDS = {"reference": "gloo", "cpu": "gloo", "cuda": "nccl"}
# Passes that must see the sharded qmatmuls (fusions that would give them epilogues, target
# layouts and schedules): shard goes before the first of them in a pipeline.
_SHARD_BEFORE = ("fuse-epilogue", "fuse-elementwise", "reorder-weights", "schedule-unpack",
                 "tile", "cpu-conv-layout", "cpu-schedule", "cpu-pack-weights",
                 "hls-fixed-point", "hls-parallelism")
TARGET_OPTIONS = ("tp",)


class TargetOptionError(InputError):
    """A target option (``NAME:key=value``) is unknown, malformed or contradicts --tp."""


def split_target(spec: str, tp: Optional[int] = None) -> tuple[str, dict]:
    """``"cuda-sm90:tp=2"`` -> ``("cuda-sm90", {"tp": 2})``; ``tp`` (the --tp flag) is merged
    in. Options are ``key=value`` pairs after a colon, comma-separated; the only one is tp."""
    if not isinstance(spec, str):
        raise TargetOptionError(f"target must be a string, not {type(spec).__name__}")
    name, sep, rest = spec.partition(":")
    options: dict = {}
    if sep:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise TargetOptionError(f"target {spec!r}: option {item!r} needs the form "
                                        "key=value (e.g. cuda-sm90:tp=2)")
            if key not in TARGET_OPTIONS:
                raise TargetOptionError(f"target {spec!r}: unknown option {key!r}; target "
                                        f"options: {', '.join(TARGET_OPTIONS)}")
            options[key] = _degree(value.strip(), f"target {spec!r}: tp")
    if tp is not None:
        tp = _degree(tp, "--tp")
        if options.get("tp", tp) != tp:
            raise TargetOptionError(f"target {spec!r} says tp={options['tp']}, --tp says {tp}")
        options["tp"] = tp
    return name, options


def _degree(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        tp = int(value)
        if isinstance(value, float) and value != tp:
            raise ValueError
    except (TypeError, ValueError):
        raise TargetOptionError(f"{what} must be an integer >= 1, got {value!r}") from None
    if tp < 1:
        raise TargetOptionError(f"{what} must be an integer >= 1, got {tp}")
    return tp


def pipeline_with_shard(pipeline: str, tp: int) -> str:
    """``pipeline`` with ``shard{tp=N}`` after the fusions that form the qmatmuls and before
    the first pass that must see the sharded ones (``_SHARD_BEFORE``: fuse-epilogue would give
    them epilogues, which shard does not split); appended when there is none. A pipeline that
    already runs shard keeps it (its degree must be tp)."""
    from qcompiler.pipeline import parse_pipeline

    passes = parse_pipeline(pipeline)
    present = [p for p in passes if p.name == "shard"]
    if present:
        if any(p.tp != tp for p in present):
            raise TargetOptionError(f"the pipeline runs {present[0].spec()}, the target asks "
                                    f"for tp={tp}")
        return ",".join(p.spec() for p in passes)
    at = next((i for i, p in enumerate(passes) if p.name in _SHARD_BEFORE), len(passes))
    specs = [p.spec() for p in passes]
    specs.insert(at, f"shard{{tp={tp}}}")
    return ",".join(specs)


def shard_stats(records: list) -> Optional[dict]:
    """The shard pass's stats from the compile's pass records (None: it did not run)."""
    for r in records:
        if r.get("pass", "").split("{")[0] == "shard":
            return {k: v for k, v in r.items()
                    if k not in ("pass", "ms", "nodes_before", "nodes_after")}
    return None


def no_blocks_reason(records: list) -> str:
    """Why shard split nothing (its stats), for the refusal of a tp > 1 compile."""
    stats = shard_stats(records)
    if stats is None:
        return "the pipeline does not run shard"
    skipped = stats.get("skipped_blocks", "none")
    return ("no MLP block matched (column-parallel float qmatmuls, an elementwise region, a "
            "row-parallel float qmatmul, none with an epilogue)" if skipped == "none"
            else f"every block was left whole: {skipped}")


def weight_bytes(module) -> int:
    """Bytes of the weights the module's constant nodes name (what its weights.safetensors
    stores once unused entries of the side table are dropped)."""
    used = {n.attrs["name"] for fn in module.functions for n in fn.nodes
            if n.op == "constant" and "name" in n.attrs}
    return int(sum(a.nbytes for k, a in module.constants.items() if k in used))


def write_sharded(out_dir: str, *, tp: int, common: dict, ranks: list[dict],
                  collectives: list[dict], report: dict, report_text: str) -> dict:
    """The top-level manifest and reports of a sharded artifact whose rank directories
    (``ranks[r]["dir"]``) are written already; returns the manifest."""
    for r in ranks:
        r["manifest_sha256"] = file_sha256(os.path.join(out_dir, r["dir"], MANIFEST_FILE))
    manifest = {"format": {"name": SHARDED_FORMAT_NAME, "version": SHARDED_FORMAT_VERSION},
                **common, "tp": tp, "ranks": ranks, "collectives": collectives}
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_TEXT), "w") as f:
        f.write(report_text)
    return manifest


def sharded_report_text(tp: int, target: str, source: str, spec: str, shard_stats: dict,
                        ranks: list[dict], unsharded_weight_bytes: int, rank_texts: list[str],
                        ) -> str:
    lines = [f"qcompiler sharded artifact: {source} for target {target}, tensor parallel tp={tp}",
             f"pipeline: {spec}",
             f"shard: {shard_stats.get('blocks', 0)} blocks split, "
             f"{shard_stats.get('skipped', 0)} left whole"
             + (f" ({shard_stats['skipped_blocks']})"
                if shard_stats.get("skipped_blocks", "none") != "none" else ""),
             f"weights: {unsharded_weight_bytes} bytes in the global module (all ranks)", "",
             "ranks:"]
    for r in ranks:
        lines.append(f"  rank {r['rank']}: {r['dir']}/  weights {r['weight_bytes']} bytes "
                     f"(qmatmul weights {r['qmatmul_weight_bytes']} bytes), "
                     f"{r['all_reduce']} all_reduce")
    for r, text in zip(ranks, rank_texts):
        lines += ["", f"==== rank {r['rank']} ({r['dir']}/report.txt) ===="]
        lines += text.rstrip("\n").split("\n")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def is_sharded_artifact(directory: str) -> bool:
    """Whether DIR's manifest.json names the sharded format (no other check)."""
    path = os.path.join(os.fspath(directory), MANIFEST_FILE)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    fmt = data.get("format") if isinstance(data, dict) else None
    return isinstance(fmt, dict) and fmt.get("name") == SHARDED_FORMAT_NAME


def read_sharded_manifest(directory: str) -> dict:
    """The checked manifest of a sharded artifact: format and version, structure, tp ranks in
    order, each rank directory a plain relative path inside DIR whose manifest.json has the
    recorded sha256. ArtifactError naming the key or file otherwise."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ArtifactError(f"{directory}: not a qcompiler artifact ({MANIFEST_FILE}: "
                            f"{e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{MANIFEST_FILE}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError("manifest.json: must hold a JSON object")
    fmt = _get(manifest, "format", dict, "")
    if _get(fmt, "name", str, "format") != SHARDED_FORMAT_NAME:
        raise ArtifactError(f"manifest.json: format {fmt['name']!r} is not "
                            f"{SHARDED_FORMAT_NAME!r}")
    version = _get(fmt, "version", int, "format")
    if version != SHARDED_FORMAT_VERSION:
        newer = " (written by a newer qcompiler)" if version > SHARDED_FORMAT_VERSION else ""
        raise ArtifactError(f"manifest.json: sharded format version {version}{newer}; this "
                            f"qcompiler reads version {SHARDED_FORMAT_VERSION}")
    for key in ("qcompiler", "target", "backend", "pipeline", "collective_backend"):
        _get(manifest, key, str, "")
    _check_values(_get(manifest, "inputs", list, ""), "inputs")
    _check_values(_get(manifest, "outputs", list, ""), "outputs")
    tp = _get(manifest, "tp", int, "")
    ranks = _get(manifest, "ranks", list, "")
    if tp < 1 or len(ranks) != tp:
        raise ArtifactError(f"manifest.json: tp = {tp} with {len(ranks)} rank entries")
    root = os.path.realpath(directory)
    for i, rec in enumerate(ranks):
        at = f"ranks[{i}]"
        if not isinstance(rec, dict):
            raise ArtifactError(f"manifest.json: {at} must be an object")
        if _get(rec, "rank", int, at) != i:
            raise ArtifactError(f"manifest.json: {at}.rank is {rec['rank']}, not {i}")
        rel = checked_relpath(_get(rec, "dir", str, at), f"{at}.dir")
        digest = _get(rec, "manifest_sha256", str, at)
        real = os.path.realpath(os.path.join(root, *rel.split("/")))
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            raise ArtifactError(f"manifest.json: {at}.dir = {rel!r} resolves to {real}, "
                                f"outside the artifact directory {root}")
        rank_manifest = os.path.join(real, MANIFEST_FILE)
        if not os.path.isfile(rank_manifest):
            raise ArtifactError(f"{rel}/{MANIFEST_FILE}: missing from the sharded artifact")
        with open(rank_manifest, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise ArtifactError(f"{rel}/{MANIFEST_FILE} was changed after the compile "
                                    "(sha256 differs from the sharded manifest)")
    return manifest


def rank_directory(directory: str, manifest: dict, rank: int) -> str:
    """The (checked) directory of rank ``rank``'s artifact."""
    return os.path.join(os.fspath(directory), *manifest["ranks"][rank]["dir"].split("/"))


__all__ = ["SHARDED_FORMAT_NAME", "SHARDED_FORMAT_VERSION", "COLLECTIVE_BACKENDS",
           "TargetOptionError", "split_target", "pipeline_with_shard", "shard_stats",
           "no_blocks_reason",
           "weight_bytes", "write_sharded", "sharded_report_text", "is_sharded_artifact",
           "read_sharded_manifest", "rank_directory"]
