"""The registries: every pass, target and backend, listed once, imported lazily.

Adding a built-in pass means adding its file under ``passes/`` and one line here; a test
checks that each key equals the registered object's own name. Passes defined outside the
package register themselves with ``@register_pass`` when their class is defined.
"""
from __future__ import annotations

import importlib

# pass name -> "module:Class" (built-in, loaded lazily) or the class (registered at run time)
PASSES: dict[str, object] = {
    "canonicalize": "qcompiler.passes.canonicalize:CanonicalizePass",
    "fuse-dequant": "qcompiler.passes.fuse_dequant:FuseDequantPass",
    "quantize-weights": "qcompiler.passes.quantize_weights:QuantizeWeightsPass",
    "hls-fixed-point": "qcompiler.passes.hls_fixed_point:HLSFixedPointPass",
    "hls-parallelism": "qcompiler.passes.hls_parallelism:HLSParallelismPass",
    "reorder-weights": "qcompiler.passes.reorder_weights:ReorderWeightsPass",
    "schedule-unpack": "qcompiler.passes.schedule_unpack:ScheduleUnpackPass",
    "tile": "qcompiler.passes.tile:TilePass",
    "cpu-schedule": "qcompiler.passes.cpu_schedule:CPUSchedulePass",
    "cpu-pack-weights": "qcompiler.passes.cpu_pack_weights:CPUPackWeightsPass",
    "fuse-attention": "qcompiler.passes.fuse_attention:FuseAttentionPass",
    "fold-attention-layout": "qcompiler.passes.fold_attention_layout:FoldAttentionLayoutPass",
    "fuse-rotary": "qcompiler.passes.fuse_rotary:FuseRotaryPass",
    "fuse-kv-concat": "qcompiler.passes.fuse_kv_concat:FuseKvConcatPass",
    "fuse-qkv": "qcompiler.passes.fuse_qkv:FuseQkvPass",
    "fuse-gate-up": "qcompiler.passes.fuse_gate_up:FuseGateUpPass",
    "fuse-rmsnorm": "qcompiler.passes.fuse_rmsnorm:FuseRMSNormPass",
    "fuse-norm-qmatmul": "qcompiler.passes.fuse_norm_qmatmul:FuseNormQmatmulPass",
    "fuse-gelu": "qcompiler.passes.fuse_gelu:FuseGeluPass",
    "unify-dims": "qcompiler.passes.unify_dims:UnifyDimsPass",
    "shard": "qcompiler.passes.shard:ShardPass",
    "fuse-epilogue": "qcompiler.passes.fuse_epilogue:FuseEpiloguePass",
    "fuse-elementwise": "qcompiler.passes.fuse_elementwise:FuseElementwisePass",
    "fold-batchnorm": "qcompiler.passes.fold_batchnorm:FoldBatchNormPass",
    "fuse-qconv": "qcompiler.passes.fuse_qconv:FuseQConvPass",
    "fuse-requant": "qcompiler.passes.fuse_requant:FuseRequantPass",
    "fuse-qpool": "qcompiler.passes.fuse_qpool:FuseQPoolPass",
    "static-qmatmul-as-qconv": "qcompiler.passes.static_qmatmul_as_qconv:StaticQmatmulAsQConvPass",
    "cpu-conv-layout": "qcompiler.passes.cpu_conv_layout:CPUConvLayoutPass",
    "conv-channels-last": "qcompiler.passes.conv_channels_last:ConvChannelsLastPass",
    "cuda-conv-layout": "qcompiler.passes.cuda_conv_layout:CudaConvLayoutPass",
    "compute-dtype": "qcompiler.passes.compute_dtype:ComputeDtypePass",
}

# backend name -> "module:Class"
BACKENDS: dict[str, str] = {
    "reference": "qcompiler.codegen.reference.backend:ReferenceBackend",
    "hls": "qcompiler.codegen.hls.backend:HLSBackend",
    "cuda": "qcompiler.codegen.cuda.backend:CudaBackend",
    "cpu": "qcompiler.codegen.cpu.backend:CPUBackend",
}


def _load(spec: str):
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def get_pass_class(name: str):
    try:
        entry = PASSES[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; registered: {', '.join(sorted(PASSES))}") from None
    return _load(entry) if isinstance(entry, str) else entry


def get_backend(name: str):
    try:
        return _load(BACKENDS[name])()
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; registered: {', '.join(BACKENDS)}") from None
