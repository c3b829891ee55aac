# from typing import TypeVar
# from tvm.script import ir as I
# from tvm.script import tirx as T
# from tvm.tirx.layout import Axis

m = TypeVar("m")
mo = TypeVar("mo")
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

    @T.prim_func
    def qmm_v0(xq: T.Buffer((mo, 2, 64), "int8"), xsum: T.Buffer((mo, 2, 2), "float32"), xs: T.Buffer((mo, 2, 2), "float32"), w: T.Buffer((1, 8, 64, 4), "uint8"), s: T.Buffer((1, 2, 64), "float32"), zc: T.Buffer((1, 2, 64), "uint8"), y: T.Buffer((mo, 2, 64), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(1):
            for io in range(mo):
                yacc_0 = T.alloc_local((4,), "float32x16")
                acc_0_0 = T.alloc_local((4,), "int32x16")
                acc_0_1 = T.alloc_local((4,), "int32x16")
                yacc_1 = T.alloc_local((4,), "float32x16")
                acc_1_0 = T.alloc_local((4,), "int32x16")
                acc_1_1 = T.alloc_local((4,), "int32x16")
                for cv in T.unroll(4):
                    yacc_0[cv] = T.Broadcast(T.float32(0.0), 16)
                    yacc_1[cv] = T.Broadcast(T.float32(0.0), 16)
                for g in range(2):
                    for cv in T.unroll(4):
                        acc_0_0[cv] = T.Broadcast(0, 16)
                        acc_0_1[cv] = T.Broadcast(0, 16)
                        acc_1_0[cv] = T.Broadcast(0, 16)
                        acc_1_1[cv] = T.Broadcast(0, 16)
                    for ko in range(1):
                        for ki in T.unroll(4):
                            a_0_0: T.int8x64 = T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", xq[io, 0, T.Ramp((g * 4 + ko * 4 + ki) * 8, 1, 4)]), 16))
                            a_0_1: T.int8x64 = T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", xq[io, 0, T.Ramp((g * 4 + ko * 4 + ki) * 8 + 4, 1, 4)]), 16))
                            a_1_0: T.int8x64 = T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", xq[io, 1, T.Ramp((g * 4 + ko * 4 + ki) * 8, 1, 4)]), 16))
                            a_1_1: T.int8x64 = T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", xq[io, 1, T.Ramp((g * 4 + ko * 4 + ki) * 8 + 4, 1, 4)]), 16))
                            for cv in T.unroll(4):
                                v: T.uint8x64 = w[t, g * 4 + ko * 4 + ki, cv * 16, T.Ramp(0, 1, 64)]
                                u0: T.int8x64 = T.reinterpret("int8x64", v & T.Broadcast(T.uint8(15), 64))
                                acc_0_0[cv] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc_0_0[cv], u0, a_0_0)
                                acc_1_0[cv] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc_1_0[cv], u0, a_1_0)
                                u1: T.int8x64 = T.reinterpret("int8x64", v & T.Broadcast(T.uint8(240), 64))
                                acc_0_1[cv] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc_0_1[cv], u1, a_0_1)
                                acc_1_1[cv] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc_1_1[cv], u1, a_1_1)
                    for cv in T.unroll(4):
                        sv: T.float32x16 = s[t, g, T.Ramp(cv * 16, 1, 16)]
                        zv: T.float32x16 = T.Cast("float32x16", zc[t, g, T.Ramp(cv * 16, 1, 16)])
                        yacc_0[cv] = yacc_0[cv] + T.Broadcast(xs[io, 0, g], 16) * sv * (T.Cast("float32x16", acc_0_0[cv] + (acc_0_1[cv] >> T.Broadcast(4, 16))) - T.Broadcast(xsum[io, 0, g], 16) * zv)
                        yacc_1[cv] = yacc_1[cv] + T.Broadcast(xs[io, 1, g], 16) * sv * (T.Cast("float32x16", acc_1_0[cv] + (acc_1_1[cv] >> T.Broadcast(4, 16))) - T.Broadcast(xsum[io, 1, g], 16) * zv)
                for cv in T.unroll(4):
                    y[io, 0, t * 64 + cv * 16:t * 64 + cv * 16 + 16] = yacc_0[cv]
                    y[io, 1, t * 64 + cv * 16:t * 64 + cv * 16 + 16] = yacc_1[cv]