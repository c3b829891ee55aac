# from typing import TypeVar
# from tvm.script import ir as I
# from tvm.script import tirx as T
# from tvm.tirx.layout import Axis

m_outer = TypeVar("m_outer")
@I.ir_module
class Module:
    @T.prim_func(s_tir=True)
    def qmm_v0(x: T.Buffer((m_outer, 256, 1), "float32"), xsum: T.Buffer((m_outer, 1, 2), "float32"), w: T.Buffer((2, 32, 64), "uint32"), s: T.Buffer((2, 2, 64), "float32"), zc: T.Buffer((2, 2, 64), "uint8"), y: T.Buffer((m_outer, 1, 128), "float32")):
        T.func_attr({"tirx.noalias": True})
        # with T.sblock("root"):
        partial = T.sblock_alloc_buffer((m_outer, 1, 2, 2, 64))
        y_global = T.sblock_alloc_buffer((m_outer, 1, 128))
        for n_0 in T.parallel(2):
            for io in range(m_outer):
                for ii_init in range(1):
                    for n_1_0_init in T.unroll(4):
                        for n_1_1_init in T.vectorized(16):
                            with T.sblock("y_init"):
                                v_io = T.axis.spatial(m_outer, io)
                                v_ii = T.axis.spatial(1, ii_init)
                                v_n = T.axis.spatial(128, n_0 * 64 + n_1_0_init * 16 + n_1_1_init)
                                T.reads()
                                T.writes(y_global[v_io, v_ii, v_n])
                                y_global[v_io, v_ii, v_n] = T.float32(0.0)
                for g in range(2):
                    for ax0_0 in range(1):
                        for ax0_1_0_init in T.unroll(4):
                            for ax0_1_1_init in T.vectorized(16):
                                with T.sblock("partial_init"):
                                    v_io = T.axis.spatial(m_outer, io)
                                    v_ii = T.axis.spatial(1, 0)
                                    v_t, v_g = T.axis.remap("SS", [n_0, g])
                                    v_j = T.axis.spatial(64, ax0_0 * 64 + ax0_1_0_init * 16 + ax0_1_1_init)
                                    T.reads()
                                    T.writes(partial[v_io, v_ii, v_t, v_g, v_j])
                                    partial[v_io, v_ii, v_t, v_g, v_j] = T.float32(0.0)
                        for ax1_0 in range(8):
                            for ax1_1 in T.unroll(16):
                                for ax0_1_0 in T.unroll(4):
                                    for ax0_1_1 in T.vectorized(16):
                                        with T.sblock("partial_update"):
                                            v_io = T.axis.spatial(m_outer, io)
                                            v_ii = T.axis.spatial(1, 0)
                                            v_t, v_g = T.axis.remap("SS", [n_0, g])
                                            v_j = T.axis.spatial(64, ax0_0 * 64 + ax0_1_0 * 16 + ax0_1_1)
                                            v_kk = T.axis.reduce(128, ax1_0 * 16 + ax1_1)
                                            T.reads(partial[v_io, v_ii, v_t, v_g, v_j], x[v_io, v_g * 128 + v_kk, v_ii], w[v_t, (v_g * 128 + v_kk) // 8, v_j])
                                            T.writes(partial[v_io, v_ii, v_t, v_g, v_j])
                                            partial[v_io, v_ii, v_t, v_g, v_j] = partial[v_io, v_ii, v_t, v_g, v_j] + x[v_io, v_g * 128 + v_kk, v_ii] * T.reinterpret("float32", w[v_t, (v_g * 128 + v_kk) // 8, v_j] >> T.Cast("uint32", (v_g * 128 + v_kk) % 8 * 4) << T.uint32(19) & T.uint32(7864320) | T.uint32(1065353216))
                    for ii in range(1):
                        for n_1_0 in T.unroll(4):
                            for n_1_1 in T.vectorized(16):
                                with T.sblock("y_update"):
                                    v_io = T.axis.spatial(m_outer, io)
                                    v_ii = T.axis.spatial(1, ii)
                                    v_n = T.axis.spatial(128, n_0 * 64 + n_1_0 * 16 + n_1_1)
                                    v_g = T.axis.reduce(2, g)
                                    T.reads(y_global[v_io, v_ii, v_n], s[v_n // 64, v_g, v_n % 64], partial[v_io, v_ii, v_n // 64, v_g, v_n % 64], xsum[v_io, v_ii, v_g], zc[v_n // 64, v_g, v_n % 64])
                                    T.writes(y_global[v_io, v_ii, v_n])
                                    y_global[v_io, v_ii, v_n] = y_global[v_io, v_ii, v_n] + s[v_n // 64, v_g, v_n % 64] * (partial[v_io, v_ii, v_n // 64, v_g, v_n % 64] - xsum[v_io, v_ii, v_g] * (T.Cast("float32", zc[v_n // 64, v_g, v_n % 64]) * T.float32(0.0625) + T.float32(1.0)))
                for ax0 in T.vectorized(64):
                    with T.sblock("y_global"):
                        v0 = T.axis.spatial(m_outer, io)
                        v1 = T.axis.spatial(1, 0)
                        v2 = T.axis.spatial(128, n_0 * 64 + ax0)
                        T.reads(y_global[v0, v1, v2])
                        T.writes(y[v0, v1, v2])
                        y[v0, v1, v2] = y_global[v0, v1, v2]