"""Models past protobuf's 2 GB: ONNX's shape inference cannot serialize them, so the frontend
gives it a view whose large initializers are typed inputs (qcompiler.frontends.onnx
``_shape_inference_view``). A 1.1B-parameter export is too big for CI; the view is forced here
on a small Llama export, and the import must be the same module as without it."""
from __future__ import annotations

import os
import sys

import pytest

from qcompiler.frontends import onnx as onnx_frontend
from qcompiler.ir import print_module

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))


def test_shape_inference_view_imports_the_same_module(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import decoder_models as dm
    import onnx

    cfg = dict(dm.SMALL_LLAMA)
    model = dm.llama(layers=2, **cfg)
    feeds = dm.llama_inputs(cfg, 2, 1, 1, 8)
    path = dm.export_onnx(model, feeds, str(tmp_path / "llama.onnx"), dynamo=False)
    want = print_module(onnx_frontend.load(path))

    proto = onnx.load(path)
    monkeypatch.setattr(onnx_frontend, "SHAPE_INFERENCE_INLINE_BYTES", 0)
    monkeypatch.setattr(onnx_frontend, "LARGE_INITIALIZER_BYTES", 1024)
    view = onnx_frontend._shape_inference_view(proto)
    moved = {i.name for i in view.graph.input} - {i.name for i in proto.graph.input}
    assert moved and all(t.name not in moved for t in view.graph.initializer)
    assert len(view.graph.initializer) + len(moved) == len(proto.graph.initializer)
    assert print_module(onnx_frontend.load(path)) == want
    # without shape inference's help some of those dims would stay symbolic: the view matters
    monkeypatch.setattr(onnx_frontend, "_shape_inference_view",
                        lambda p: (_ for _ in ()).throw(ValueError("2 GB")))
    assert print_module(onnx_frontend.load(path)) != want


def test_sizes_past_protobufs_limit_count_as_large():
    """protobuf refuses to size a message past 2 GB; that must read as "large", not fail."""
    class Huge:
        def ByteSize(self):
            raise ValueError("Failed to serialize proto")

    assert onnx_frontend._message_bytes(Huge()) == float("inf")
