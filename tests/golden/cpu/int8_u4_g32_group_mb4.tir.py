# from typing import TypeVar
# from tvm.script import ir as I
# from tvm.script import tirx as T
# from tvm.tirx.layout import Axis

m = TypeVar("m")
m_outer = TypeVar("m_outer")
@I.ir_module
class Module:
    @T.prim_func
    def qmm_quantize(x: T.Buffer((m, 64), "float32"), xq: T.Buffer((m, 64), "int8"), scale: T.Buffer((m, 2), "float32"), xsum: T.Buffer((m, 2), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i, g in T.grid(m, 2):
            vmax: T.int32x16
            vsum: T.int32x16
            vmax = T.Broadcast(0, 16)
            vsum = T.Broadcast(0, 16)
            for c in T.unroll(2):
                vmax = T.max(vmax, T.reinterpret("int32x16", T.fabs(x[i, T.Ramp(g * 32 + c * 16, 1, 16)])))
            amax: T.float32 = T.reinterpret("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.smax", vmax))
            scale[i, g] = T.Select(amax > T.float32(0.0), amax * T.float32(0.007874015748031496), T.float32(1.0))
            inv: T.float32 = T.Select(amax > T.float32(0.0), T.float32(127.0) / amax, T.float32(0.0))
            for c in T.unroll(2):
                q: T.int32x16 = T.Cast("int32x16", T.nearbyint(x[i, T.Ramp(g * 32 + c * 16, 1, 16)] * T.Broadcast(inv, 16)))
                xq[i, g * 32 + c * 16:g * 32 + c * 16 + 16] = T.Cast("int8x16", q)
                vsum = vsum + q
            xsum[i, g] = T.Cast("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", vsum))

    @T.prim_func
    def qmm_quantize_rows(x: T.Buffer((m, 64), "float32"), xq: T.Buffer((m, 64), "int8"), scale: T.Buffer((m, 2), "float32"), xsum: T.Buffer((m, 2), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.parallel(m):
            for g in range(2):
                vmax: T.int32x16
                vsum: T.int32x16
                vmax = T.Broadcast(0, 16)
                vsum = T.Broadcast(0, 16)
                for c in T.unroll(2):
                    vmax = T.max(vmax, T.reinterpret("int32x16", T.fabs(x[i, T.Ramp(g * 32 + c * 16, 1, 16)])))
                amax: T.float32 = T.reinterpret("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.smax", vmax))
                scale[i, g] = T.Select(amax > T.float32(0.0), amax * T.float32(0.007874015748031496), T.float32(1.0))
                inv: T.float32 = T.Select(amax > T.float32(0.0), T.float32(127.0) / amax, T.float32(0.0))
                for c in T.unroll(2):
                    q: T.int32x16 = T.Cast("int32x16", T.nearbyint(x[i, T.Ramp(g * 32 + c * 16, 1, 16)] * T.Broadcast(inv, 16)))
                    xq[i, g * 32 + c * 16:g * 32 + c * 16 + 16] = T.Cast("int8x16", q)
                    vsum = vsum + q
                xsum[i, g] = T.Cast("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", vsum))

    @T.prim_func(s_tir=True)
    def qmm_v0(xq: T.Buffer((m_outer, 4, 64), "int8"), xsum: T.Buffer((m_outer, 4, 2), "float32"), x_scale: T.Buffer((m_outer, 4, 2), "float32"), w: T.Buffer((1, 8, 64, 4), "uint8"), s: T.Buffer((1, 2, 64), "float32"), zc: T.Buffer((1, 2, 64), "uint8"), y: T.Buffer((m_outer, 4, 64), "float32")):
        T.func_attr({"tirx.noalias": True})
        # with T.sblock("root"):
        unpack_local = T.sblock_alloc_buffer((1, 16, 64, 4), "uint8", scope="local")
        partial_local = T.sblock_alloc_buffer((m_outer, 4, 1, 2, 64), "int32", scope="local")
        for n_0 in T.parallel(1):
            for io_init, ii_init in T.grid(m_outer, 4):
                for n_1_0_init in T.unroll(4):
                    for n_1_1_init in T.vectorized(16):
                        with T.sblock("y_init"):
                            v_io = T.axis.spatial(m_outer, io_init)
                            v_ii = T.axis.spatial(4, ii_init)
                            v_n = T.axis.spatial(64, n_0 * 64 + n_1_0_init * 16 + n_1_1_init)
                            T.reads()
                            T.writes(y[v_io, v_ii, v_n])
                            y[v_io, v_ii, v_n] = T.float32(0.0)
            for g in range(2):
                for ax0_0 in range(4):
                    for ax0_1 in T.unroll(2):
                        for ax1_ax2_fused in T.vectorized(256):
                            with T.sblock("unpack"):
                                v_t = T.axis.spatial(1, 0)
                                v_k4 = T.axis.spatial(16, g * 8 + ax0_0 * 2 + ax0_1)
                                v_j = T.axis.spatial(64, ax1_ax2_fused // 4)
                                v_b = T.axis.spatial(4, ax1_ax2_fused % 4)
                                T.reads(w[v_t, v_k4 // 2, v_j, v_b])
                                T.writes(unpack_local[v_t, v_k4, v_j, v_b])
                                unpack_local[v_t, v_k4, v_j, v_b] = w[v_t, v_k4 // 2, v_j, v_b] >> T.Cast("uint8", v_k4 % 2 * 4) & T.uint8(15)
                for io in range(m_outer):
                    for ax0_init, ax1_0_init, ax1_1_init in T.grid(4, 4, 16):
                        with T.sblock("partial_init"):
                            v_io = T.axis.spatial(m_outer, io)
                            v_ii = T.axis.spatial(4, ax0_init)
                            v_t = T.axis.spatial(1, 0)
                            v_g = T.axis.spatial(2, g)
                            v_j = T.axis.spatial(64, ax1_0_init * 16 + ax1_1_init)
                            T.reads()
                            T.writes(partial_local[v_io, v_ii, v_t, v_g, v_j])
                            partial_local[v_io, v_ii, v_t, v_g, v_j] = 0
                    for ax2_0 in range(8):
                        for ax0 in T.unroll(4):
                            for ax1_0 in T.unroll(4):
                                with T.sblock("partial_update_o"):
                                    v_io_o, v_ii_o = T.axis.remap("SS", [io, ax0])
                                    v_t_o = T.axis.spatial(1, 0)
                                    v_g_o, v_j_o, v_kk_o = T.axis.remap("SSR", [g, ax1_0, ax2_0])
                                    T.reads(partial_local[v_io_o, v_ii_o, v_t_o, v_g_o, v_j_o * 16:v_j_o * 16 + 16], unpack_local[v_t_o, v_g_o * 8 + v_kk_o, v_j_o * 16:v_j_o * 16 + 16, 0:4], xq[v_io_o, v_ii_o, v_g_o * 32 + v_kk_o * 4:v_g_o * 32 + v_kk_o * 4 + 4])
                                    T.writes(partial_local[v_io_o, v_ii_o, v_t_o, v_g_o, v_j_o * 16:v_j_o * 16 + 16])
                                    A = T.match_buffer(xq[v_io_o, v_ii_o, v_g_o * 32 + v_kk_o * 4:v_g_o * 32 + v_kk_o * 4 + 4], (T.int64(4),), "int8", offset_factor=1)
                                    B = T.match_buffer(unpack_local[v_t_o, v_g_o * 8 + v_kk_o, v_j_o * 16:v_j_o * 16 + 16, 0:4], (T.int64(16), T.int64(4)), "uint8", scope="local", offset_factor=1)
                                    C = T.match_buffer(partial_local[v_io_o, v_ii_o, v_t_o, v_g_o, v_j_o * 16:v_j_o * 16 + 16], (T.int64(16),), "int32", scope="local", offset_factor=1)
                                    C[T.int64(0):T.int64(16)] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", C[T.Ramp(T.int64(0), T.int64(1), 16)], T.reinterpret("int8x64", B[T.int64(0), T.Ramp(T.int64(0), T.int64(1), 64)]), T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", A[T.Ramp(T.int64(0), T.int64(1), 4)]), 16)))
                    for ii in range(4):
                        for n_1_0 in T.unroll(4):
                            for n_1_1 in T.vectorized(16):
                                with T.sblock("y_update"):
                                    v_io = T.axis.spatial(m_outer, io)
                                    v_ii = T.axis.spatial(4, ii)
                                    v_n = T.axis.spatial(64, n_0 * 64 + n_1_0 * 16 + n_1_1)
                                    v_g = T.axis.reduce(2, g)
                                    T.reads(y[v_io, v_ii, v_n], x_scale[v_io, v_ii, v_g], s[v_n // 64, v_g, v_n % 64], partial_local[v_io, v_ii, v_n // 64, v_g, v_n % 64], xsum[v_io, v_ii, v_g], zc[v_n // 64, v_g, v_n % 64])
                                    T.writes(y[v_io, v_ii, v_n])
                                    y[v_io, v_ii, v_n] = y[v_io, v_ii, v_n] + x_scale[v_io, v_ii, v_g] * s[v_n // 64, v_g, v_n % 64] * (T.Cast("float32", partial_local[v_io, v_ii, v_n // 64, v_g, v_n % 64]) - xsum[v_io, v_ii, v_g] * T.Cast("float32", zc[v_n // 64, v_g, v_n % 64]))