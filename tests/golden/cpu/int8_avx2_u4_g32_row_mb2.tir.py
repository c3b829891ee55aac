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
            vmax: T.int32x8
            vsum: T.int32x8
            vmax = T.Broadcast(0, 8)
            vsum = T.Broadcast(0, 8)
            for c in T.unroll(4):
                vmax = T.max(vmax, T.reinterpret("int32x8", T.fabs(x[i, T.Ramp(g * 32 + c * 8, 1, 8)])))
            amax: T.float32 = T.reinterpret("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.smax", vmax))
            scale[i, g] = T.Select(amax > T.float32(0.0), amax * T.float32(0.007874015748031496), T.float32(1.0))
            inv: T.float32 = T.Select(amax > T.float32(0.0), T.float32(127.0) / amax, T.float32(0.0))
            for c in T.unroll(4):
                q: T.int32x8 = T.Cast("int32x8", T.nearbyint(x[i, T.Ramp(g * 32 + c * 8, 1, 8)] * T.Broadcast(inv, 8)))
                xq[i, g * 32 + c * 8:g * 32 + c * 8 + 8] = T.Cast("int8x8", q)
                vsum = vsum + q
            xsum[i, g] = T.Cast("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", vsum))

    @T.prim_func
    def qmm_quantize_rows(x: T.Buffer((m, 64), "float32"), xq: T.Buffer((m, 64), "int8"), scale: T.Buffer((m, 2), "float32"), xsum: T.Buffer((m, 2), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.parallel(m):
            for g in range(2):
                vmax: T.int32x8
                vsum: T.int32x8
                vmax = T.Broadcast(0, 8)
                vsum = T.Broadcast(0, 8)
                for c in T.unroll(4):
                    vmax = T.max(vmax, T.reinterpret("int32x8", T.fabs(x[i, T.Ramp(g * 32 + c * 8, 1, 8)])))
                amax: T.float32 = T.reinterpret("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.smax", vmax))
                scale[i, g] = T.Select(amax > T.float32(0.0), amax * T.float32(0.007874015748031496), T.float32(1.0))
                inv: T.float32 = T.Select(amax > T.float32(0.0), T.float32(127.0) / amax, T.float32(0.0))
                for c in T.unroll(4):
                    q: T.int32x8 = T.Cast("int32x8", T.nearbyint(x[i, T.Ramp(g * 32 + c * 8, 1, 8)] * T.Broadcast(inv, 8)))
                    xq[i, g * 32 + c * 8:g * 32 + c * 8 + 8] = T.Cast("int8x8", q)
                    vsum = vsum + q
                xsum[i, g] = T.Cast("float32", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", vsum))

    @T.prim_func
    def qmm_v0(xq: T.Buffer((mo, 2, 64), "int8"), xsum: T.Buffer((mo, 2, 2), "float32"), xs: T.Buffer((mo, 2, 2), "float32"), w: T.Buffer((2, 8, 32, 4), "uint8"), s: T.Buffer((2, 2, 32), "float32"), zc: T.Buffer((2, 2, 32), "uint8"), y: T.Buffer((mo, 2, 64), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(2):
            for io in range(mo):
                for p in T.unroll(2):
                    yacc_0 = T.alloc_local((2,), "float32x8")
                    acc_0 = T.alloc_local((2,), "int32x8")
                    acc16_0 = T.alloc_local((2,), "int16x16")
                    yacc_1 = T.alloc_local((2,), "float32x8")
                    acc_1 = T.alloc_local((2,), "int32x8")
                    acc16_1 = T.alloc_local((2,), "int16x16")
                    for cv in T.unroll(2):
                        yacc_0[cv] = T.Broadcast(T.float32(0.0), 8)
                        yacc_1[cv] = T.Broadcast(T.float32(0.0), 8)
                    for g in range(2):
                        for cv in T.unroll(2):
                            acc_0[cv] = T.Broadcast(0, 8)
                            acc_1[cv] = T.Broadcast(0, 8)
                        for f in range(1):
                            for cv in T.unroll(2):
                                acc16_0[cv] = T.Broadcast(T.int16(0), 16)
                                acc16_1[cv] = T.Broadcast(T.int16(0), 16)
                            for ko in range(1):
                                for ki in T.unroll(4):
                                    a_0_0: T.int8x32 = T.reinterpret("int8x32", T.Broadcast(T.reinterpret("int32", xq[io, 0, T.Ramp((g * 4 + f * 4 + ko * 4 + ki) * 8, 1, 4)]), 8))
                                    a_0_1: T.int8x32 = T.reinterpret("int8x32", T.Broadcast(T.reinterpret("int32", xq[io, 0, T.Ramp((g * 4 + f * 4 + ko * 4 + ki) * 8 + 4, 1, 4)]), 8))
                                    a_1_0: T.int8x32 = T.reinterpret("int8x32", T.Broadcast(T.reinterpret("int32", xq[io, 1, T.Ramp((g * 4 + f * 4 + ko * 4 + ki) * 8, 1, 4)]), 8))
                                    a_1_1: T.int8x32 = T.reinterpret("int8x32", T.Broadcast(T.reinterpret("int32", xq[io, 1, T.Ramp((g * 4 + f * 4 + ko * 4 + ki) * 8 + 4, 1, 4)]), 8))
                                    for cv in T.unroll(2):
                                        v: T.uint8x32 = w[t, g * 4 + f * 4 + ko * 4 + ki, (p * 2 + cv) * 8, T.Ramp(0, 1, 32)]
                                        u0: T.uint8x32 = v & T.Broadcast(T.uint8(15), 32)
                                        acc16_0[cv] = acc16_0[cv] + T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.reinterpret("int8x32", u0), a_0_0)
                                        acc16_1[cv] = acc16_1[cv] + T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.reinterpret("int8x32", u0), a_1_0)
                                        u1: T.uint8x32 = v >> T.Broadcast(T.uint8(4), 32)
                                        acc16_0[cv] = acc16_0[cv] + T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.reinterpret("int8x32", u1), a_0_1)
                                        acc16_1[cv] = acc16_1[cv] + T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.reinterpret("int8x32", u1), a_1_1)
                            for cv in T.unroll(2):
                                acc_0[cv] = acc_0[cv] + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", acc16_0[cv], T.Broadcast(T.int16(1), 16))
                                acc_1[cv] = acc_1[cv] + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", acc16_1[cv], T.Broadcast(T.int16(1), 16))
                        for cv in T.unroll(2):
                            sv: T.float32x8 = s[t, g, T.Ramp((p * 2 + cv) * 8, 1, 8)]
                            zv: T.float32x8 = T.Cast("float32x8", zc[t, g, T.Ramp((p * 2 + cv) * 8, 1, 8)])
                            yacc_0[cv] = yacc_0[cv] + T.Broadcast(xs[io, 0, g], 8) * sv * (T.Cast("float32x8", acc_0[cv]) - T.Broadcast(xsum[io, 0, g], 8) * zv)
                            yacc_1[cv] = yacc_1[cv] + T.Broadcast(xs[io, 1, g], 8) * sv * (T.Cast("float32x8", acc_1[cv]) - T.Broadcast(xsum[io, 1, g], 8) * zv)
                    for cv in T.unroll(2):
                        y[io, 0, t * 32 + (p * 2 + cv) * 8:t * 32 + (p * 2 + cv) * 8 + 8] = yacc_0[cv]
                        y[io, 1, t * 32 + (p * 2 + cv) * 8:t * 32 + (p * 2 + cv) * 8 + 8] = yacc_1[cv]