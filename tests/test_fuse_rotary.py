"""fuse-rotary: the exported example Llama's rotate_half rotary embedding becomes the ONNX
rotary_embedding op, with the reference's results unchanged; tables whose halves differ (not
the non-interleaved rotary) are left alone."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from qcompiler.runtime import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))


def _exported(tmp_path, layers=2, dynamo=False):
    pytest.importorskip("torch")
    import decoder_models as dm

    from qcompiler.driver.api import run_pipeline
    from qcompiler.driver.frontend import import_model

    cfg = dict(dm.SMALL_LLAMA)
    path = dm.export_onnx(dm.llama(layers=layers, **cfg), dm.llama_inputs(cfg, layers, 1, 3, 5),
                          str(tmp_path / "l.onnx"), dynamo=dynamo)
    return dm, cfg, run_pipeline(import_model(path), "canonicalize", verify_each=True)[0]


def _ops(module):
    out: dict = {}
    for n in module.main.nodes:
        out[n.op] = out.get(n.op, 0) + 1
    return out


def _fuse(module):
    from qcompiler.driver.api import run_pipeline

    return run_pipeline(module, "fuse-rotary", verify_each=True)[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_rotate_half_becomes_rotary_embedding(tmp_path, dynamo):
    """Both exporters: torchscript gathers the table rows (gather), dynamo with gather_nd."""
    dm, cfg, base = _exported(tmp_path, dynamo=dynamo)
    assert ("gather_nd" in _ops(base)) == dynamo
    fused = _fuse(base.clone())
    ops = _ops(fused)
    assert ops.get("rotary_embedding") == 4  # q and k of 2 layers
    assert "neg" not in ops and ops.get("slice", 0) == _ops(base).get("slice", 0) - 8
    node = next(n for n in fused.main.nodes if n.op == "rotary_embedding")
    assert node.attrs["interleaved"] == 0 and node.operands[3].name == "position_ids"
    head_dim = cfg["hidden"] // cfg["heads"]
    assert node.operands[1].type.shape[1] == head_dim // 2
    # the four rotary ops share one half table each for cos and sin
    tables = {(n.operands[1].name, n.operands[2].name) for n in fused.main.nodes
              if n.op == "rotary_embedding"}
    assert len(tables) == 1
    for seed in (1, 2):
        feeds = dm.llama_inputs(cfg, 2, 2, 3, 5, seed=seed)
        want, got = reference.run(base, feeds), reference.run(fused, feeds)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_tables_with_different_halves_are_not_rotary(tmp_path):
    """Break the tables' duplicated halves: the same graph is then not a rotary embedding."""
    dm, cfg, base = _exported(tmp_path, layers=1)
    from qcompiler.ir.core import constant_value

    changed = 0
    for n in base.main.nodes:
        if n.op == "gather" and n.operands[0].producer is not None \
                and n.operands[0].producer.op == "constant":
            table = constant_value(base, n.operands[0])
            if table is not None and table.ndim == 2 and table.shape[1] == 16:
                key = next(k for k, v in base.constants.items() if v is table) \
                    if any(v is table for v in base.constants.values()) else None
                if key is None:
                    continue
                bent = table.copy()
                bent[:, -1] += 0.5
                base.constants[key] = bent
                changed += 1
    assert changed == 2
    assert "rotary_embedding" not in _ops(_fuse(base))
