"""The CUDA weight layout in numpy (no GPU): exact round trips, the fragment positions the
kernel assumes, and a numpy model of the kernel's arithmetic against the reference."""
import numpy as np
import pytest

from qcompiler.codegen.cuda import bench_support as bs
from qcompiler.codegen.cuda import cases
from qcompiler.codegen.cuda import layout as L
from qcompiler.codegen.cuda.emulate import decode_weight, emulate
from qcompiler.ir.core import constant_value
from qcompiler.pipeline import PassError


@pytest.mark.parametrize("cb", [4, 8])
def test_pack_unpack_round_trip(cb):
    rng = np.random.default_rng()
    u = rng.integers(0, 1 << cb, (16 * 5, 64 * 3)).astype(np.uint8)
    words = L.pack_codes(u, cb)
    assert words.shape == (5, 3, cb // 4, 32, 4) and words.dtype == np.uint32
    assert np.array_equal(L.unpack_codes(words, cb), u)


@pytest.mark.parametrize("cb", [4, 8])
def test_each_lane_holds_its_mma_fragments(cb):
    """Lane 4g+q of a k16 x n64 tile holds columns 16t + 8h + g and rows 2q + {0,1} (b0 b1),
    2q + 8 + {0,1} (b2 b3), in the bit positions the unpack code reads."""
    rng = np.random.default_rng()
    u = rng.integers(0, 1 << cb, (32, 128)).astype(np.uint8)
    words = L.pack_codes(u, cb)
    for ks, nb, lane in [(0, 0, 0), (1, 1, 13), (1, 0, 31)]:
        g, q = lane // 4, lane % 4
        for t in range(4):
            for h in range(2):
                for k8 in range(2):
                    for kodd in range(2):
                        k = 16 * ks + 8 * k8 + 2 * q + kodd
                        n = 64 * nb + 16 * t + 8 * h + g
                        if cb == 4:
                            word = int(words[ks, nb, 0, lane, t])
                            code = (word >> (4 * (4 * kodd + 2 * h + k8))) & 0xF
                        else:
                            unit = 2 * t + h
                            word = int(words[ks, nb, unit // 4, lane, unit % 4])
                            code = (word >> (8 * (2 * k8 + kodd))) & 0xFF
                        assert code == u[k, n]


def test_group_rows_permutation():
    rng = np.random.default_rng()
    s = rng.standard_normal((3, 192)).astype(np.float32)
    p = L.permute_group_rows(s)
    assert np.array_equal(L.unpermute_group_rows(p), s)
    for nb, g, t, h in [(0, 0, 0, 0), (2, 5, 3, 1), (1, 7, 2, 0)]:
        assert p[1, 64 * nb + 8 * g + 2 * t + h] == s[1, 64 * nb + 16 * t + 8 * h + g]


def test_act_order_permutation_makes_groups_contiguous():
    rng = np.random.default_rng()
    g_idx = rng.permutation(np.arange(256) // 64)
    perm = L.act_order_permutation(g_idx, 64)
    assert np.array_equal(g_idx[perm], np.arange(256) // 64)
    with pytest.raises(ValueError, match="exactly 64 rows"):
        L.act_order_permutation(np.array([0] * 65 + [1] * 63), 64)


FORMATS = [
    cases.Case(k=256, n=96, bits=4, zero_point=True, group=64, act_order=True, bias=True),
    cases.Case(k=200, n=37, bits=8, zero_point=True, group=0),
    cases.Case(k=192, n=64, bits=4, signed=True, zero_point=False, group=32, dtype="bf16"),
    cases.Case(k=128, n=130, bits=2, zero_point=True, group=16),
    cases.Case(k=384, n=64, bits=3, signed=True, zero_point=False, group=128, dtype="bf16"),
    cases.Case(k=688, n=70, bits=8, signed=True, zero_point=False, group=0, bias=True),
    cases.Case(k=196, n=65, bits=4, zero_point=True, group=0, dtype="bf16", scale_dtype="f32"),
    cases.Case(k=11008, n=37, bits=4, zero_point=True, group=128),
]


@pytest.mark.parametrize("case", FORMATS, ids=lambda c: c.name)
def test_packed_codes_decode_to_the_original(case):
    module = cases.make_module(case, seed=7)
    _, packed, node = bs.pack_case(case, module=module)
    orig = next(n for n in module.main.nodes if n.op == "qmatmul")
    w = constant_value(module, orig.arg("w")).astype(np.int32)
    lo = case.scheme().dtype.int_range()[0]
    u, z, s, perm = decode_weight(packed, node)
    if perm is not None:
        w = w[perm]
    assert np.array_equal(u[:case.k, :case.n], w - lo)
    assert not u[case.k:].any() and not u[:, case.n:].any()


@pytest.mark.parametrize("case", FORMATS, ids=lambda c: c.name)
def test_numpy_model_of_the_kernel_matches_the_reference(case):
    """What the kernel computes from the packed constants (exact decode, rounding where the
    kernel rounds) equals the reference on the unpacked module within fp tolerance."""
    module = cases.make_module(case, seed=11)
    _, packed, node = bs.pack_case(case, module=module)
    for m in (1, 5, 33):
        x = cases.random_x(case, m, seed=int(np.random.default_rng().integers(1 << 30)))
        err = cases.rel_error(emulate(packed, node, x), cases.reference(module, x))
        assert err <= cases.TOLERANCE[case.dtype], (m, err)


def test_refusals_name_the_node():
    def packs(case, **changes):
        module = cases.make_module(case)
        node = next(n for n in module.main.nodes if n.op == "qmatmul")
        for k, v in changes.items():
            if k == "x_dtype":
                from qcompiler.ir.types import elem

                module.main.args[0].type = module.main.args[0].type.replace(dtype=elem(v))
            else:
                node.attrs[k] = v
        return bs.pack_case(case, module=module)

    base = cases.Case(k=128, n=64, bits=4, zero_point=True, group=64)
    with pytest.raises(PassError, match=r"%y = qmatmul: activations are f32"):
        packs(base, x_dtype="f32")
    with pytest.raises(PassError, match="group size 48"):
        packs(cases.Case(k=96, n=64, bits=4, group=48))
    with pytest.raises(PassError, match="groups along N"):
        packs(base, w_scheme=base.scheme().replace(axis=1))
    with pytest.raises(PassError, match="act=dynamic"):
        packs(base, act="dynamic")


def test_f32_model_runs_in_f16_with_compute_dtype():
    """An f32 ONNX model (the shipped MatMulNBits MLP) on the CUDA pipeline with
    reorder-weights{compute_dtype=f16}: casts around each kernel; the numpy model of the
    kernels, run inside the whole graph, stays within fp16 rounding of the reference."""
    import os

    from qcompiler.frontends.onnx import load
    from qcompiler.pipeline import PassManager
    from qcompiler.runtime.reference import run

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    module = load(os.path.join(root, "examples", "mlp_int4.onnx"))
    with pytest.raises(PassError, match="compute_dtype=f16"):
        PassManager.parse("canonicalize,fuse-dequant,canonicalize,reorder-weights").run(module)
    spec = ("canonicalize,fuse-dequant,canonicalize,reorder-weights{compute_dtype=f16},"
            "schedule-unpack,tile{target=cuda-sm90}")
    out = PassManager.parse(spec).run(module)
    assert sum(n.op == "cast" for n in out.main.nodes) == 6
    kernels = {n.result.name: (lambda node, args, mod: [emulate(mod, node, args[0])])
               for n in out.main.nodes if n.op == "qmatmul"}
    x = np.random.default_rng().standard_normal((5, 64)).astype(np.float32)
    got = run(out, {"x": x}, kernels=kernels)["y"]
    want = run(module, {"x": x})["y"]
    assert cases.rel_error(got, want) < 3e-3
