# from tvm.script import tirx as T
# from tvm.tirx.layout import Axis

@T.prim_func(s_tir=True)
def qconv_034069ec5bd06464(in0: T.Buffer((1, 8, 8, 16), "uint8"), in1: T.Buffer((32, 16, 3, 3), "int8"), in2: T.Buffer((), "float32"), in3: T.Buffer((), "uint8"), in4: T.Buffer((32,), "float32"), in5: T.Buffer((32,), "int8"), in6: T.Buffer((32,), "int32"), in7: T.Buffer((), "float32"), in8: T.Buffer((), "uint8"), out: T.Buffer((1, 8, 8, 32), "uint8")):
    T.func_attr({"tirx.noalias": True})
    # with T.sblock("root"):
    wq = T.sblock_alloc_buffer((1, 2, 3, 3, 4, 16, 4), "int8")
    xq = T.sblock_alloc_buffer((1, 1, 10, 10, 16), "uint8")
    xsum = T.sblock_alloc_buffer((1, 1, 8, 8), "int32")
    ones = T.sblock_alloc_buffer((4,), "uint8")
    wsum = T.sblock_alloc_buffer((1, 2, 16), "int32")
    offset = T.sblock_alloc_buffer((32,), "int32")
    scale = T.sblock_alloc_buffer((32,))
    sum_global = T.sblock_alloc_buffer((1, 1, 8, 8, 2, 16), "int32")
    wsum_local = T.sblock_alloc_buffer((1, 2, 16), "int32", scope="local")
    for g, mo, yy, xx, co, mi, ci in T.grid(1, 2, 3, 3, 4, 16, 4):
        with T.sblock("wq"):
            v_g, v_mo, v_yy, v_xx, v_co, v_mi, v_ci = T.axis.remap("SSSSSSS", [g, mo, yy, xx, co, mi, ci])
            T.reads(in1[T.min(v_g * 32 + v_mo * 16 + v_mi, 31), v_co * 4 + v_ci, v_yy, v_xx])
            T.writes(wq[v_g, v_mo, v_yy, v_xx, v_co, v_mi, v_ci])
            wq[v_g, v_mo, v_yy, v_xx, v_co, v_mi, v_ci] = T.Cast("int8", T.if_then_else(v_mo * 16 + v_mi < 32 and v_co * 4 + v_ci < 16, T.Cast("int32", in1[T.min(v_g * 32 + v_mo * 16 + v_mi, 31), v_co * 4 + v_ci, v_yy, v_xx]), 0))
    for nn_g_yy_fused in T.parallel(10):
        for xx, cc in T.grid(10, 16):
            with T.sblock("xq_pad_const"):
                v_nn = T.axis.spatial(1, 0)
                v_g = T.axis.spatial(1, 0)
                v_yy, v_xx, v_cc = T.axis.remap("SSS", [nn_g_yy_fused, xx, cc])
                T.reads()
                T.writes(xq[v_nn, v_g, v_yy, v_xx, v_cc])
                xq[v_nn, v_g, v_yy, v_xx, v_cc] = T.uint8(7)
        for xx, cc in T.grid(8, 16):
            with T.sblock("xq"):
                v_nn = T.axis.spatial(1, 0)
                v_g = T.axis.spatial(1, 0)
                v_yy = T.axis.spatial(8, nn_g_yy_fused + -1)
                v_xx, v_cc = T.axis.remap("SS", [xx, cc])
                T.where(1 <= nn_g_yy_fused % 10 and nn_g_yy_fused % 10 < 9)
                T.reads(in0[v_nn, v_yy, v_xx, T.min(v_g * 16 + v_cc, 15)])
                T.writes(xq[v_nn, v_g, v_yy + 1, v_xx + 1, v_cc])
                xq[v_nn, v_g, v_yy + 1, v_xx + 1, v_cc] = T.Cast("uint8", T.Cast("int32", in0[v_nn, v_yy, v_xx, T.min(v_g * 16 + v_cc, 15)]))
    for nn_g_yy_fused in T.parallel(8):
        for xx, sy, sx, sc in T.grid(8, 3, 3, 16):
            with T.sblock("xsum"):
                v_nn = T.axis.spatial(1, 0)
                v_g = T.axis.spatial(1, 0)
                v_yy, v_xx, v_sy, v_sx, v_sc = T.axis.remap("SSRRR", [nn_g_yy_fused, xx, sy, sx, sc])
                T.reads(xq[v_nn, v_g, v_yy + v_sy, v_xx + v_sx, v_sc])
                T.writes(xsum[v_nn, v_g, v_yy, v_xx])
                with T.init():
                    xsum[v_nn, v_g, v_yy, v_xx] = 0
                xsum[v_nn, v_g, v_yy, v_xx] = xsum[v_nn, v_g, v_yy, v_xx] + T.Cast("int32", xq[v_nn, v_g, v_yy + v_sy, v_xx + v_sx, v_sc])
    for i in range(4):
        with T.sblock("ones"):
            v_i = T.axis.spatial(4, i)
            T.reads()
            T.writes(ones[v_i])
            ones[v_i] = T.uint8(1)
    for g, mo in T.grid(1, 2):
        for mi_init in T.vectorized(16):
            with T.sblock("wsum_init"):
                v_g, v_mo, v_mi = T.axis.remap("SSS", [g, mo, mi_init])
                T.reads()
                T.writes(wsum_local[v_g, v_mo, v_mi])
                wsum_local[v_g, v_mo, v_mi] = 0
        for wy, wx, wco in T.grid(3, 3, 4):
            with T.sblock("wsum_update_o"):
                v_g_o, v_mo_o = T.axis.remap("SS", [g, mo])
                v_mi_o = T.axis.spatial(1, 0)
                v_wy_o, v_wx_o, v_wco_o = T.axis.remap("RRR", [wy, wx, wco])
                v_wci_o = T.axis.reduce(1, 0)
                T.reads(wsum_local[v_g_o, v_mo_o, 0:16], wq[v_g_o, v_mo_o, v_wy_o, v_wx_o, v_wco_o, 0:16, 0:4], ones[0:4])
                T.writes(wsum_local[v_g_o, v_mo_o, 0:16])
                A = T.match_buffer(ones[0:4], (4,), "uint8", offset_factor=1)
                B = T.match_buffer(wq[v_g_o, v_mo_o, v_wy_o, v_wx_o, v_wco_o, 0:16, 0:4], (16, 4), "int8", offset_factor=1)
                C = T.match_buffer(wsum_local[v_g_o, v_mo_o, 0:16], (16,), "int32", scope="local", offset_factor=1)
                C[0:16] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", C[T.Ramp(0, 1, 16)], T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", A[T.Ramp(0, 1, 4)]), 16)), B[0, T.Ramp(0, 1, 64)])
        for ax0 in T.vectorized(16):
            with T.sblock("wsum_local"):
                v0 = T.axis.spatial(1, 0)
                v1, v2 = T.axis.remap("SS", [mo, ax0])
                T.reads(wsum_local[v0, v1, v2])
                T.writes(wsum[v0, v1, v2])
                wsum[v0, v1, v2] = wsum_local[v0, v1, v2]
    for mm in range(32):
        with T.sblock("offset"):
            v_mm = T.axis.spatial(32, mm)
            T.reads(in3[()], in5[v_mm], in6[v_mm], wsum[0, v_mm // 16, v_mm % 16])
            T.writes(offset[v_mm])
            offset[v_mm] = T.Cast("int32", in3[()]) * T.Cast("int32", in5[v_mm]) * 144 + in6[v_mm] - T.Cast("int32", in3[()]) * wsum[0, v_mm // 16, v_mm % 16]
    for mm in range(32):
        with T.sblock("scale"):
            v_mm = T.axis.spatial(32, mm)
            T.reads(in2[()], in4[v_mm], in7[()])
            T.writes(scale[v_mm])
            scale[v_mm] = in2[()] * in4[v_mm] / in7[()]
    for nn_mm_0_fused in T.parallel(1):
        for yy, xx_0 in T.grid(8, 2):
            for ax0_init in T.unroll(1):
                for ax1_init in T.unroll(1):
                    for ax2_init in T.unroll(1):
                        for ax3_init in T.unroll(4):
                            for ax4_init in T.unroll(2):
                                for ax5_init in T.vectorized(16):
                                    with T.sblock("sum_init"):
                                        v_nn, v_g = T.axis.remap("SS", [ax0_init, ax1_init])
                                        v_yy = T.axis.spatial(8, yy + ax2_init)
                                        v_xx = T.axis.spatial(8, xx_0 * 4 + ax3_init)
                                        v_mo, v_mi = T.axis.remap("SS", [ax4_init, ax5_init])
                                        T.reads()
                                        T.writes(sum_global[v_nn, v_g, v_yy, v_xx, v_mo, v_mi])
                                        sum_global[v_nn, v_g, v_yy, v_xx, v_mo, v_mi] = 0
            for ax6, ax7, ax8, ax0, ax1, ax2 in T.grid(3, 3, 4, 1, 1, 1):
                for ax3 in T.unroll(4):
                    for ax4 in T.unroll(2):
                        with T.sblock("sum_update_o"):
                            v_nn_o, v_g_o = T.axis.remap("SS", [ax0, ax1])
                            v_yy_o = T.axis.spatial(8, yy + ax2)
                            v_xx_o = T.axis.spatial(8, xx_0 * 4 + ax3)
                            v_mo_o = T.axis.spatial(2, ax4)
                            v_mi_o = T.axis.spatial(1, 0)
                            v_ry_o, v_rx_o, v_rco_o = T.axis.remap("RRR", [ax6, ax7, ax8])
                            v_rci_o = T.axis.reduce(1, 0)
                            T.reads(sum_global[v_nn_o, v_g_o, v_yy_o, v_xx_o, v_mo_o, 0:16], wq[v_g_o, v_mo_o, v_ry_o, v_rx_o, v_rco_o, 0:16, 0:4], xq[v_nn_o, v_g_o, v_yy_o + v_ry_o, v_xx_o + v_rx_o, v_rco_o * 4:v_rco_o * 4 + 4])
                            T.writes(sum_global[v_nn_o, v_g_o, v_yy_o, v_xx_o, v_mo_o, 0:16])
                            A = T.match_buffer(xq[v_nn_o, v_g_o, v_yy_o + v_ry_o, v_xx_o + v_rx_o, v_rco_o * 4:v_rco_o * 4 + 4], (4,), "uint8", offset_factor=1)
                            B = T.match_buffer(wq[v_g_o, v_mo_o, v_ry_o, v_rx_o, v_rco_o, 0:16, 0:4], (16, 4), "int8", offset_factor=1)
                            C = T.match_buffer(sum_global[v_nn_o, v_g_o, v_yy_o, v_xx_o, v_mo_o, 0:16], (16,), "int32", offset_factor=1)
                            C[0:16] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", C[T.Ramp(0, 1, 16)], T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", A[T.Ramp(0, 1, 4)]), 16)), B[0, T.Ramp(0, 1, 64)])
            for xx_1 in T.unroll(4):
                for mm_1_0 in range(1):
                    for mm_1_1 in T.vectorized(32):
                        with T.sblock("out"):
                            v_nn = T.axis.spatial(1, 0)
                            v_yy = T.axis.spatial(8, yy)
                            v_xx = T.axis.spatial(8, xx_0 * 4 + xx_1)
                            v_mm = T.axis.spatial(32, mm_1_0 * 32 + mm_1_1)
                            T.reads(sum_global[v_nn, 0, v_yy, v_xx, v_mm // 16, v_mm % 16], offset[v_mm], in5[v_mm], xsum[v_nn, 0, v_yy, v_xx], scale[v_mm], in8[()])
                            T.writes(out[v_nn, v_yy, v_xx, v_mm])
                            out[v_nn, v_yy, v_xx, v_mm] = T.Cast("uint8", T.reinterpret("int32", T.min(T.max(T.Cast("float32", sum_global[v_nn, 0, v_yy, v_xx, v_mm // 16, v_mm % 16] + offset[v_mm] - T.Cast("int32", in5[v_mm]) * xsum[v_nn, 0, v_yy, v_xx]) * scale[v_mm], T.Cast("float32", 110 - T.Cast("int32", in8[()]))), T.Cast("float32", 255 - T.Cast("int32", in8[()]))) + T.float32(12582912.0)) + T.Cast("int32", in8[()]) - 1262485504)