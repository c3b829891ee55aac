#!/bin/bash
# Run on the GPU machine (the device tool runs commands in a copy of this repository):
#   bash benchmarks/run_on_gpu.sh [gpu-tests] [wgmma-tests] [tests] [wgmma-ncu] [int8] [act8-tests] [act8-int8] [act8-fp8] [cnn] [cnn-tiles] [cnn-dw] [whole] [sanitize] [models] [norm-ab] [fill-ab] [pad-loop] [session] [acc-ab] [decode-loop] [decode-trace] [decode-ops] [decode-ab] [pairs-ab] [minilm-gemm] [minilm-peers] [minilm-trace] [gemm-m256] [prefill] [prefill-peers] [prefill-stages] [prefill-halves] [prefill-trace] [prefill-ab] [l2-ab] [decode-nopdl] [loop-profile] [ops-tests] [gemv-sweep] [bench] [bench-nopdl] [bench-quick] [sweep-quick] [sweep-ms] [sweep-small] [sweep] [profile] [decode-gemv-ncu] [stalls] [tune]
# Installs qcompiler without dependencies (the machine has numpy, jinja2, onnx, ml_dtypes,
# networkx, safetensors, torch), then runs the chosen steps. Logs and JSON go to $OUT.
# Steps that build the 22-layer TinyLlama-width model (l2-ab, decode-nopdl, loop-profile,
# prefill-peers, models) spend 100-150 s on the torch model, its export, quantization and
# compile before measuring anything: give each >= 240 s (their default limits), and the
# call room for them (on 2026-12-07 limits of 80-150 s measured nothing).
# The cnn steps read gpu_cnn/ (bench_cnn_gpu.py --prepare gpu_cnn; git-ignored): pass
# carry=["gpu_cnn"] to the device tool.
set -u
OUT=${OUT:-/tmp/qc_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
rm -rf /tmp/qc_site  # a warm machine keeps the last call's install: pip --target would not replace it
python3 -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/qc_site . \
  >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/qc_site
cd /tmp  # import the installed package, not the checkout
REPO=$OLDPWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
# the base of an A/B: build/ab_base.tar (git archive of the base commit, carried) in /tmp/qc_base
install_base() {
  rm -rf /tmp/qc_base
  python3 -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/qc_base \
    "$REPO/build/ab_base.tar" >"$OUT/install-base.log" 2>&1 || { tail -3 "$OUT/install-base.log"; exit 1; }
}
# the decode rows of bench_cuda_ops.py (CUDA-graph timed) on the base and on this tree
decode_ops_ab() {
  for side in base new; do
    site=$([ $side = base ] && echo /tmp/qc_base || echo /tmp/qc_site)
    PYTHONPATH=$site timeout 100 python3 "$REPO/benchmarks/bench_cuda_ops.py" \
      --only attention_decode_gqa --out "$OUT/ops-$side" 2>&1 | grep -E '^\{|no CUDA graph' \
      | python3 -c "import json,sys; [print('$side', r['shape'], r['qcompiler_us'], 'torch', r['torch_us']) if l.startswith('{') and (r := json.loads(l)) else print(l.strip()) for l in sys.stdin]"
  done
}
for step in "$@"; do
  case $step in
    gpu-tests)  # the single-GPU tests of every CUDA file: qmatmul variants, ops, convolutions
      timeout ${GPU_TESTS_TIMEOUT:-300} python3 -m pytest -q -n 12 -p no:cacheprovider --rootdir "$REPO" \
        -m gpu "$REPO/tests/test_cuda_gpu.py" "$REPO/tests/test_cuda_ops.py" "$REPO/tests/test_cuda_conv.py" 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -40 ;;
    wgmma-tests)  # the sm_90a wgmma kernels' GPU tests (16- and 8-bit activations) alone (~60 s)
      timeout ${WGMMA_TESTS_TIMEOUT:-150} python3 -m pytest -q -n 12 -p no:cacheprovider --rootdir "$REPO" \
        -m gpu "$REPO/tests/test_cuda_gpu.py" -k wgmma 2>&1 | tee "$OUT/wgmma-tests.log" \
        | grep -E "FAILED|ERROR|passed|failed" | tail -20 ;;
    tests)
      python3 -m pytest -q -x -n 12 -p no:cacheprovider --rootdir "$REPO" \
        "$REPO/tests/test_cuda_gpu.py" 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    int8)  # issue #14: the 8-bit-activation kernels' GPU tests (int8 W4A8, FP8 W8A8), then them against cuBLAS fp16/int8, FP8 and our W4A16
      timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_cuda_gpu.py" \
        -k "int8 or fp8" 2>&1 | tee "$OUT/int8-tests.log" | tail -12
      timeout 200 python3 "$REPO/benchmarks/bench_prefill_gemm.py" --large --fp8 --no-tiled --ms 256,1024,4096 \
        --only "heuristic,fp8" --out "$OUT" 2>&1 | tee "$OUT/fp8-bench.log" | grep -E "M=|wrote|rror" | tail -50
      timeout 360 python3 "$REPO/benchmarks/bench_prefill_gemm.py" --large --int8 --no-tiled --ms 64,256,1024,4096 \
        --only "heuristic,int8" --out "$OUT" 2>&1 | tee "$OUT/int8-bench.log" | grep -E "M=|wrote|rror" | tail -70
      timeout 240 python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT/int8" --skip-minilm --skip-llama \
        --prefill 512 --int8-min-m 128 2>&1 | tee "$OUT/int8-prefill.log" | grep -iE "prefill|check|FAIL" | tail -8 ;;
    act8-tests)  # issue #14: the sm_90a wgmma kernel with 8-bit activations (wgmma_act8.cuh) against its numpy models
      timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_cuda_gpu.py" \
        -k "wgmma_int8 or wgmma_fp8" 2>&1 | tee "$OUT/act8-tests.log" | tail -15 ;;
    act8-int8|act8-fp8)  # issue #14: W4A8 / W8A8-FP8 on wgmma beside W4A16, the tiled int8 kernel, cuBLAS fp16/int8/FP8
                         # (ACT8_ONLY=heuristic ACT8_MS=256,1024,4096: the heuristic's tiles alone)
      fmt=${step#act8-}
      timeout ${ACT8_TIMEOUT:-330} python3 "$REPO/benchmarks/bench_prefill_gemm.py" --large --$fmt --no-tiled \
        --ms ${ACT8_MS:-256,4096} \
        --only "${ACT8_ONLY:-heuristic,wgmma mf8 wn2 wk2 st4 sk1,wgmma mf4 wn4,wgmma mf8 wn1,wgmma mf16 wn2}" \
        --out "$OUT" 2>&1 | tee "$OUT/$fmt-bench.log" | grep -E "M=|wrote|rror" | tail -80 ;;
    cnn)  # issue #15: the CUDA conv kernel tests, then bench_cnn_gpu.py on gpu_cnn/ (made by --prepare
          # here): ours with a per-launch trace, torch eager and torch.compile (reduce-overhead; the
          # max-autotune modes outlast a call), then the batch-1 trace without launch overlap
      timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider --rootdir "$REPO" -m gpu "$REPO/tests/test_cuda_conv.py" \
        2>&1 | tee "$OUT/conv-tests.log" | tail -5
      timeout 300 python3 "$REPO/benchmarks/bench_cnn_gpu.py" --run "$REPO/gpu_cnn" --out "$OUT" --trace \
        --compile-modes reduce-overhead 2>&1 | tee "$OUT/bench-cnn.log" | grep -v "^    " | tail -30
      mkdir -p "$OUT/no-overlap"
      QC_CUDA_PDL=0 QC_CUDA_LANES=1 timeout 120 python3 "$REPO/benchmarks/bench_cnn_gpu.py" --run "$REPO/gpu_cnn" \
        --out "$OUT/no-overlap" --formats qdq --batches 1 --skip-compile-peer --trace >"$OUT/trace-no-overlap.log" 2>&1
      grep "trace " "$OUT/trace-no-overlap.log" ;;
    cnn-tiles)  # issue #15: qconv tile tables, one compile and traced run of each (ResNet-18 and
                # MobileNetV2 QDQ at batch 64 on gpu_cnn/): QC_QCONV_TABLES holds the tables
                # (QC_QCONV_TILES syntax) separated by spaces; "default" is the built-in table
      for table in ${QC_QCONV_TABLES:-default}; do
        name=$(echo "$table" | tr ':;' '_-' | cut -c1-80)
        mkdir -p "$OUT/tiles/$name"
        if [ "$table" = default ]; then unset QC_QCONV_TILES; else export QC_QCONV_TILES="$table"; fi
        timeout 200 python3 "$REPO/benchmarks/bench_cnn_gpu.py" --run "$REPO/gpu_cnn" --out "$OUT/tiles/$name" \
          --models ${QC_CNN_MODELS:-resnet18,mobilenetv2} \
          --formats qdq --batches ${QC_CNN_BATCHES:-64} --skip-compile-peer --trace > "$OUT/tiles/$name/log" 2>&1
        echo "== $table: $(grep -E "check|graph" "$OUT/tiles/$name/log" | grep -v "^    " | tr '\n' ' ' | cut -c1-300)"
      done
      unset QC_QCONV_TILES ;;
    cnn-dw)  # issue #15: depthwise strips (QC_DW_STRIP=VEC:PX; "default" is _dw_strip's choice), one
             # compile and traced run of MobileNetV2 QDQ at batches 1 and 64 each; QC_DW_STRIPS lists them
      for strip in ${QC_DW_STRIPS:-default}; do
        name=dw-$(echo "$strip" | tr ':' 'x')
        mkdir -p "$OUT/$name"
        if [ "$strip" = default ]; then unset QC_DW_STRIP; else export QC_DW_STRIP="$strip"; fi
        timeout 200 python3 "$REPO/benchmarks/bench_cnn_gpu.py" --run "$REPO/gpu_cnn" --out "$OUT/$name" \
          --models mobilenetv2 --formats qdq --batches 1,64 --skip-compile-peer --trace > "$OUT/$name/log" 2>&1
        echo "== $strip: $(grep -E "check|graph" "$OUT/$name/log" | grep -v "^    " | tr '\n' ' ' | cut -c1-400)"
      done
      unset QC_DW_STRIP ;;
    whole)
      python3 -m pytest -q -n 12 -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_cuda_plan.py" \
        "$REPO/tests/test_cuda_ops.py" -k "not compiles" 2>&1 | tee "$OUT/whole-tests.log" | tail -15
      timeout 300 python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" --llama-layers 2 2>&1 \
        | tee "$OUT/bench-models-gpu.log" | tail -25 ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 python3 "$REPO/benchmarks/sanitize_cuda.py" \
          >"$OUT/sanitize-$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $?"; tail -4 "$OUT/sanitize-$tool.log"
      done ;;
    models)  # the whole-model rows of issue #12: MiniLM, Llama decode (+ one-stream A/B), prefill
      timeout 540 python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" --llama-layers 22 \
        --compile-peers all --lanes-ab --prefill 512 2>&1 | tee "$OUT/models.log" \
        | grep -v '^ *[0-9]*,$' | grep -B1 -A3 "ours\|check\|greedy\|FAIL" | tail -60 ;;
    norm-ab)  # issue #12: fuse-norm-qmatmul's GPU tests, then the 22-layer decode (traced, 8
              # greedy tokens against torch) without and with the RMSNorms in the projections,
              # both compiled from one export in one process (--x-norm-ab: ~330 s in all;
              # give the call >= 420 s)
      timeout 200 python3 -m pytest -q -n 4 -p no:cacheprovider --rootdir "$REPO" -m gpu \
        "$REPO/tests/test_cuda_gpu.py" -k "norms_in_the_projections or fused_epilogues" 2>&1 \
        | tee "$OUT/norm-tests.log" | tail -4
      mkdir -p "$OUT/decode-ab"
      timeout ${NORM_AB_TIMEOUT:-400} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT/decode-ab" \
        --skip-minilm --llama-layers 22 --greedy 8 --trace --x-norm-ab > "$OUT/decode-ab.log" 2>&1
      grep -E "ours|x_norm|greedy|FAIL|trace llama" "$OUT/decode-ab.log" | cut -c1-200 ;;
    decode-loop)  # issue #12: the GPU tests of the x_norm GEMV and of the generation loop, then
                  # the 22-layer decode (16 greedy tokens against torch) with its generation
                  # loop timed with and without reshaping the last signature in place, then
                  # with the RMSNorms in the projections (--x-norm)
      timeout 150 python3 -m pytest -q -n 4 -p no:cacheprovider --rootdir "$REPO" -m gpu \
        "$REPO/tests/test_cuda_gpu.py" -k "norms_in_the_projections or fused_epilogues or generation_loop" \
        2>&1 | tee "$OUT/loop-tests.log" | tail -4
      for variant in plain x-norm; do
        mkdir -p "$OUT/decode-$variant"
        flag=$([ $variant = x-norm ] && echo --x-norm || echo --reshape-ab)
        timeout 200 python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT/decode-$variant" \
          --skip-minilm --llama-layers 22 --greedy 16 $flag > "$OUT/decode-$variant.log" 2>&1
        echo "== $variant: $(grep -E "ours|graph|greedy|loop|FAIL" "$OUT/decode-$variant.log" | tr '\n' ' ' | cut -c1-500)"
      done ;;
    decode-ops)  # issue #12: decode attention alone, build/ab_base.tar's code against this tree
      install_base
      decode_ops_ab ;;
    decode-ab)  # issue #12: decode attention, the code of build/ab_base.tar (git archive of the
                # base commit, carried) against this tree: the attention GPU tests, the decode
                # rows of bench_cuda_ops.py on both, then the 22-layer decode on both (8 greedy
                # tokens against torch on this tree)
      install_base
      timeout 200 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" -m gpu \
        "$REPO/tests/test_cuda_ops.py" -k attention 2>&1 | tee "$OUT/attention-tests.log" | tail -3
      decode_ops_ab
      for side in base new; do
        site=$([ $side = base ] && echo /tmp/qc_base || echo /tmp/qc_site)
        greedy=$([ $side = base ] && echo 0 || echo 8)
        mkdir -p "$OUT/decode-$side"
        PYTHONPATH=$site timeout 200 python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT/decode-$side" \
          --skip-minilm --llama-layers 22 --greedy $greedy > "$OUT/decode-$side.log" 2>&1
        echo "== $side: $(grep -E "ours|check.*FAIL|greedy" "$OUT/decode-$side.log" | tr '\n' ' ' | cut -c1-300)"
      done ;;
    prefill)  # the prefill GEMMs' heuristic vs cuBLAS (M 512 and 4096), then the 22-layer prefill alone
      timeout 150 python3 "$REPO/benchmarks/bench_prefill_gemm.py" --no-tiled --ms 512,4096 \
        --only heuristic --out "$OUT" 2>&1 | grep -E "M=|wrote|rror" | tail -20
      timeout 240 python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" --skip-minilm --skip-llama \
        --prefill 512 2>&1 | tee "$OUT/prefill.log" | grep -iE "prefill|check|FAIL" | tail -8 ;;
    prefill-peers)  # issue #12: the 22-layer prefill of 512 tokens beside torch eager and torch.compile
      timeout ${PREFILL_TIMEOUT:-300} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" --skip-minilm \
        --skip-llama --prefill 512 --compile-peers all 2>&1 | tee "$OUT/prefill-peers.log" \
        | grep -iE "prefill|check|FAIL" | tail -8 ;;
    prefill-stages)  # issues #12, #14: the wgmma ring's depth at M = 512 (the heuristic's 6
                     # against 8 and 12 stages, where they fit) on the 22-layer model's GEMM
                     # shapes beside cuBLAS, then an 8-layer prefill of 512 tokens compiled
                     # as is, with 12 stages, with the wgmma kernels' PDL and with both, in one
                     # process, traced (~450 s in all; STAGES_LAYERS=22
                     # STAGES_EXTRA="--compile-peers all": the 22-layer one beside torch.compile)
      timeout ${STAGES_GEMM_TIMEOUT:-220} python3 "$REPO/benchmarks/bench_prefill_gemm.py" --no-tiled --ms 512 \
        --stages 8,12 --shapes 2560x2048,2048x2048,11264x2048,2048x5632 \
        --only "${STAGES_GEMM_ONLY:-heuristic,m128 n128 c2 sk1,m128 n64 c1 sk1}" --out "$OUT" 2>&1 \
        | tee "$OUT/prefill-stages-gemm.log" | grep -E "M=|wrote|rror" | tail -60
      mkdir -p "$OUT/prefill-stages"
      timeout ${STAGES_PREFILL_TIMEOUT:-300} python3 "$REPO/benchmarks/bench_models_gpu.py" \
        --out "$OUT/prefill-stages" --skip-minilm --skip-llama --llama-layers ${STAGES_LAYERS:-8} \
        --prefill 512 ${STAGES_EXTRA:---trace} --prefill-ab wgmma_stages=12 \
        $([ -n "${STAGES_SKIP_PDL_ALONE:-}" ] || echo --prefill-ab wgmma_pdl=1) \
        --prefill-ab wgmma_stages=12,wgmma_pdl=1 > "$OUT/prefill-stages.log" 2>&1
      grep -E "llama prefill 512|tile\{|logits|FAIL" "$OUT/prefill-stages.log" | cut -c1-300 ;;
    prefill-halves)  # issues #12, #14 (stop 55's leads, ~300 s): the block split with two warpgroups
                     # on one n64 block (blocks m128/m256 n64 c2) beside the heuristic and cuBLAS at
                     # M = 512, then the 8-layer prefill with the wgmma kernels' PDL against without
      timeout ${HALVES_GEMM_TIMEOUT:-150} python3 "$REPO/benchmarks/bench_prefill_gemm.py" --no-tiled --ms 512 \
        --shapes 2560x2048,2048x2048,11264x2048,2048x5632 \
        --only "heuristic,m128 n64 c2,m256 n64 c2,m128 n128 c2 sk1,m256 n128 c2 sk1" --out "$OUT" 2>&1 \
        | tee "$OUT/prefill-halves-gemm.log" | grep -E "M=|wrote|rror" | tail -40
      mkdir -p "$OUT/prefill-pdl"
      timeout ${HALVES_PREFILL_TIMEOUT:-200} python3 "$REPO/benchmarks/bench_models_gpu.py" \
        --out "$OUT/prefill-pdl" --skip-minilm --skip-llama --skip-small --llama-layers ${HALVES_LAYERS:-8} \
        --prefill 512 --prefill-ab wgmma_pdl=1 > "$OUT/prefill-pdl.log" 2>&1
      grep -E "llama prefill 512|tile\{|logits|FAIL" "$OUT/prefill-pdl.log" | cut -c1-300 ;;
    prefill-trace)  # issue #12: where an 8-layer prefill of 512 tokens goes, per kernel (~150 s):
                    # the 22-layer one took 4.43 ms against torch.compile's 2.99 on an H100 (stop 54)
      mkdir -p "$OUT/prefill-trace"
      timeout ${PREFILL_TRACE_TIMEOUT:-240} python3 "$REPO/benchmarks/bench_models_gpu.py" \
        --out "$OUT/prefill-trace" --skip-minilm --skip-llama --llama-layers 8 --prefill 512 --trace \
        > "$OUT/prefill-trace.log" 2>&1
      grep -E "llama prefill 512:|logits|FAIL" "$OUT/prefill-trace.log" | cut -c1-300
      python3 -c "import json,glob; d=json.load(open(sorted(glob.glob('$OUT/prefill-trace/models-gpu-*.json'))[-1])); [print('  ', k['kernel'][:100], k['launches'], k['us']) for r in d['results'] if r.get('trace') for k in r['trace']['by_kernel']]" 2>&1 | head -16 ;;
    prefill-ab)  # issue #12: the 8-layer prefill of 512 tokens, traced, on build/ab_base.tar's
                 # code and on this tree (attention, qkv_heads, RMSNorm per launch)
      install_base
      for side in base new; do
        site=$([ $side = base ] && echo /tmp/qc_base || echo /tmp/qc_site)
        mkdir -p "$OUT/prefill-$side"
        PYTHONPATH=$site timeout ${PREFILL_AB_TIMEOUT:-200} python3 "$REPO/benchmarks/bench_models_gpu.py" \
          --out "$OUT/prefill-$side" --skip-minilm --skip-llama --llama-layers 8 --prefill 512 --trace \
          > "$OUT/prefill-$side.log" 2>&1
        echo "== $side: $(grep -E "llama prefill 512:|logits|FAIL" "$OUT/prefill-$side.log" | tr '\n' ' ' | cut -c1-400)"
        python3 -c "import json,glob; d=json.load(open(sorted(glob.glob('$OUT/prefill-$side/models-gpu-*.json'))[-1])); [print('  ', k['kernel'][:60], k['launches'], k['us']) for r in d['results'] if r.get('trace') for k in r['trace']['by_kernel']]" 2>&1 | head -12
      done ;;
    pairs-ab)  # issue #12: the 22-layer decode (session graph, traced, 8 greedy tokens against torch) on
               # build/ab_base.tar's code and on this tree, e.g. a tile-heuristic change (~230 s a
               # side; PAIRS_AB_LAYERS=8 for ~90)
      install_base
      for side in base new; do
        site=$([ $side = base ] && echo /tmp/qc_base || echo /tmp/qc_site)
        mkdir -p "$OUT/decode-$side"
        PYTHONPATH=$site timeout ${PAIRS_AB_TIMEOUT:-270} python3 "$REPO/benchmarks/bench_models_gpu.py" \
          --out "$OUT/decode-$side" --skip-minilm --llama-layers ${PAIRS_AB_LAYERS:-22} --greedy 8 --session --trace \
          > "$OUT/decode-$side.log" 2>&1
        echo "== $side: $(grep -E "ours|session|greedy|FAIL" "$OUT/decode-$side.log" | tr '\n' ' ' | cut -c1-500)"
        python3 -c "import json,glob; d=json.load(open(sorted(glob.glob('$OUT/decode-$side/models-gpu-*.json'))[-1])); [print('  ', k['kernel'][:60], k['launches'], k['us']) for r in d['results'] if r.get('session_trace') for k in r['session_trace']['by_kernel']]" 2>&1 | head -10
      done ;;
    decode-nopdl)  # issue #12: the 22-layer decode traced without programmatic dependent launch
                   # (QC_CUDA_PDL=0): each kernel's own duration, none waiting for its predecessor
      mkdir -p "$OUT/decode-nopdl"
      QC_CUDA_PDL=0 timeout ${NOPDL_TIMEOUT:-240} python3 "$REPO/benchmarks/bench_models_gpu.py" \
        --out "$OUT/decode-nopdl" --skip-minilm --llama-layers 22 --greedy 0 --trace \
        > "$OUT/decode-nopdl.log" 2>&1
      echo "== no PDL: $(grep -E "ours|FAIL" "$OUT/decode-nopdl.log" | tr '\n' ' ' | cut -c1-300)"
      python3 -c "import json,glob; d=json.load(open(sorted(glob.glob('$OUT/decode-nopdl/models-gpu-*.json'))[-1])); [print('  ', k['kernel'][:60], k['launches'], k['us']) for r in d['results'] if r.get('trace') for k in r['trace']['by_kernel']]" 2>&1 | head -12 ;;
    fill-ab)  # issue #12: the 22-layer decode (traced, 8 greedy tokens against torch) with the tile
              # pass's GEMV heuristic and with tile{gemv_fill=1}, both from one export in one
              # process (~330 s; give the call >= 420 s)
      mkdir -p "$OUT/fill-ab"
      timeout ${FILL_AB_TIMEOUT:-400} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT/fill-ab" \
        --skip-minilm --llama-layers 22 --greedy 8 --trace --gemv-fill-ab > "$OUT/fill-ab.log" 2>&1
      grep -E "ours|gemv_fill|greedy|FAIL|trace llama" "$OUT/fill-ab.log" | cut -c1-200 ;;
    pad-loop)  # issue #12: the generation-loop GPU test (capacity padding on and off), then the
               # 22-layer loop (32 greedy tokens against torch) with and without the capacity's graph
      timeout 200 python3 -m pytest -q -n 2 -p no:cacheprovider --rootdir "$REPO" -m gpu \
        "$REPO/tests/test_cuda_gpu.py" -k "generation_loop" 2>&1 | tee "$OUT/loop-tests.log" | tail -4
      timeout ${DECODE_TIMEOUT:-330} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" --skip-minilm \
        --llama-layers 22 --greedy 32 --pad-ab 2>&1 | tee "$OUT/pad-loop.log" \
        | grep -E "ours|greedy|generation|FAIL|rror" | cut -c1-220 ;;
    acc-ab)  # issue #12: the 22-layer decode (traced, 8 greedy tokens against torch) with the GEMV's
             # scales on each warp's sums (tile{gemv_acc_scale=1}) and without, one export, one process;
             # then the acc_scale GEMV's emulation-checked variants on the GPU
      timeout 100 python3 -m pytest -q -n 2 -p no:cacheprovider --rootdir "$REPO" -m gpu \
        "$REPO/tests/test_cuda_gpu.py" -k "acc_scale" 2>&1 | tee "$OUT/acc-tests.log" | tail -3
      timeout ${DECODE_TIMEOUT:-330} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" \
        --skip-minilm --llama-layers 22 --greedy 8 --trace --gemv-acc-scale-ab > "$OUT/acc-ab.log" 2>&1
      grep -E "ours|gemv_acc_scale|greedy|FAIL|trace llama" "$OUT/acc-ab.log" | cut -c1-200 ;;
    session)  # issue #12: the decode session's GPU test (the KV cache kept on the device), then the
              # 22-layer loop (32 greedy tokens against torch) with and without the session, traced
      timeout 200 python3 -m pytest -q -n 2 -p no:cacheprovider --rootdir "$REPO" -m gpu \
        "$REPO/tests/test_cuda_gpu.py" -k "session or generation_loop" 2>&1 | tee "$OUT/session-tests.log" | tail -4
      timeout ${DECODE_TIMEOUT:-360} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" --skip-minilm \
        --llama-layers 22 --greedy 32 --session --trace 2>&1 | tee "$OUT/session.log" \
        | grep -E "ours|greedy|generation|session|FAIL|rror" | cut -c1-220 ;;
    decode-trace)  # issue #12: the 22-layer decode at context 512 (32 greedy tokens against torch), its
                   # graph replay per kernel (trace) and its generation loop unprofiled
      timeout ${DECODE_TIMEOUT:-330} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" --skip-minilm \
        --llama-layers 22 --greedy 32 --trace 2>&1 | tee "$OUT/decode-trace.log" \
        | grep -v -e '^ *"' -e '^ *[][{}]' -e '^ *[0-9.]*,\?$' | tail -45 ;;
    loop-profile)  # issue #12: a 22-layer generation loop of 32 tokens with its host time profiled
                   # (cProfile's top functions: the shape resolve, the table, the launches)
      mkdir -p "$OUT/loop-profile"
      timeout ${LOOP_TIMEOUT:-260} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT/loop-profile" \
        --skip-minilm --llama-layers 22 --greedy 32 --generation-profile > "$OUT/loop-profile.log" 2>&1
      grep -E "ours|greedy|generation|FAIL" "$OUT/loop-profile.log" | cut -c1-200 | head -8
      grep -A22 "tottime" "$OUT/loop-profile.log" | cut -c1-150 | head -26 ;;
    l2-ab)  # issue #12: the 22-layer decode (graph replay, traced) with the GEMV weights prefetched
            # into L2 before each kernel's wait (QC_CUDA_L2_PREFETCH=1) and without, alternated
      for round in $(seq ${L2_AB_ROUNDS:-2}); do
        for pf in 0 1; do
          mkdir -p "$OUT/l2-$pf-$round"
          QC_CUDA_L2_PREFETCH=$pf timeout ${L2_AB_TIMEOUT:-240} python3 "$REPO/benchmarks/bench_models_gpu.py" \
            --out "$OUT/l2-$pf-$round" --skip-minilm --llama-layers 22 --greedy 4 --trace \
            > "$OUT/l2-$pf-$round.log" 2>&1
          echo "== prefetch=$pf round $round: $(grep -E "ours|greedy|FAIL|span" "$OUT/l2-$pf-$round.log" | tr '\n' ' ' | cut -c1-400)"
        done
      done ;;
    ops-tests)  # the op kernels' and convolutions' GPU tests (attention, qkv_heads, qconv)
      timeout 170 python3 -m pytest -q -n 12 -p no:cacheprovider --rootdir "$REPO" -m gpu \
        "$REPO/tests/test_cuda_ops.py" "$REPO/tests/test_cuda_conv.py" 2>&1 | tee "$OUT/ops-tests.log" \
        | grep -E "FAILED|ERROR|passed|failed" | tail -20 ;;
    gemv-sweep)  # the GEMV heuristic against the best of a sweep, decode and large shapes, M 1 and 16
      python3 "$REPO/benchmarks/bench_cuda.py" --sweep --gemv-only --ms 1,16 --shapes \
        2048x2048,256x2048,11264x2048,2048x5632,32000x2048,4096x4096,28672x8192,8192x28672 \
        --out "$OUT" 2>&1 | tee "$OUT/gemv-sweep.log" | tail -20 ;;
    bench)
      python3 "$REPO/benchmarks/bench_cuda.py" --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -50 ;;
    bench-nopdl)
      QC_CUDA_PDL=0 python3 "$REPO/benchmarks/bench_cuda.py" --quick --out "$OUT/nopdl" 2>&1 | tee "$OUT/bench-nopdl.log" | tail -12 ;;
    bench-quick)
      python3 "$REPO/benchmarks/bench_cuda.py" --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30 ;;
    sweep-quick)
      python3 "$REPO/benchmarks/bench_cuda.py" --quick --sweep --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
    minilm-gemm)  # issue #12: every tile config (narrow ones too) on MiniLM's GEMM shapes at M = 16
                  # and 256 (1x16 and 8x32), against the heuristic and cuBLAS fp16
      timeout 400 python3 "$REPO/benchmarks/bench_cuda.py" --sweep --every-frag --ms 16,64,256,512 \
        --shapes 1152x384,384x384,1536x384,384x1536,2048x2048 --out "$OUT" 2>&1 | tee "$OUT/minilm-gemm.log" \
        | grep -vE '^\{' | tail -14 ;;
    minilm-peers)  # issue #12: the MiniLM-shaped encoder (1x16, 8x32) beside torch eager and torch.compile
      timeout ${MINILM_TIMEOUT:-200} python3 "$REPO/benchmarks/bench_models_gpu.py" --out "$OUT" --skip-llama \
        --compile-peers minilm 2>&1 | tee "$OUT/minilm-peers.log" | grep -E "^minilm|FAIL" | cut -c1-260 ;;
    minilm-trace)  # issue #12: the MiniLM-shaped encoder's graph replay, per kernel (trace) and
                   # per launch alone (profile)
      timeout 300 python3 "$REPO/benchmarks/bench_models_gpu.py" --skip-llama --trace --profile \
        --out "$OUT" 2>&1 | tee "$OUT/minilm-trace.log" | grep -v -e '^ *"' -e '^ *[][{}]' | tail -60 ;;
    gemm-m256)  # issue #12: Nsight Compute metrics of the tiled kernel on MiniLM 8x32's GEMM
                # shapes at M = 256 (the heuristic's config, the sweep's 2x2-warp best, 16-row
                # tiles), K 128 against 384 for the fixed cost, and a 2048^2 GEMV at M = 1
      M='gpu__time_duration.sum,smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
      for job in "1152 384 256:0,2,1,4,3,128,0,1 0,2,2,2,4,128,0,1 0,1,1,4,3,128,0,1" \
                 "1152 128 256:0,2,1,4,3,128,0,1 0,2,2,2,4,128,0,1" \
                 "384 1536 256:0,8,1,1,6,64,0,1 0,2,1,4,3,128,0,4" \
                 "2048 2048 1:1,1,1,16,8,64,0,1 1,1,1,8,8,64,0,2"; do
        shape=${job%%:*}; cfgs=${job#*:}; f="$OUT/ncu-gemm-$(echo $shape | tr ' ' x).txt"
        timeout 120 ncu --cache-control none --clock-control none --metrics "$M" \
          --kernel-name regex:qmatmul python3 "$REPO/benchmarks/profile_cuda.py" $shape $cfgs > "$f" 2>&1
        echo "== $shape: $(grep -E "duration" "$f" | tr -s ' ' | tr '\n' ' ' | cut -c1-200)"
      done ;;
    wgmma-ncu)  # issue #14: Nsight Compute on the heuristic's sm_90a wgmma tiles, W4A16 and W8A8-FP8,
                # at M = 256 on 4096^2 and M = 1024 on 14336x4096 (time, issue, stalls, DRAM)
      M='gpu__time_duration.sum,smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size,launch__registers_per_thread,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
      for job in "4096 4096 256" "14336 4096 1024" "--fp8 4096 4096 256" "--fp8 14336 4096 1024"; do
        f="$OUT/ncu-wgmma-$(echo $job | tr -d '-' | tr ' ' x).txt"
        timeout ${NCU_TIMEOUT:-120} ncu --metrics "$M" --kernel-name regex:qmatmul \
          python3 "$REPO/benchmarks/profile_cuda.py" $job heuristic > "$f" 2>&1
        echo "== $job: $(grep -E "duration|gmma|issue_active|dram__" "$f" | tr -s ' ' | tr '\n' ' ' | cut -c1-300)"
      done ;;
    profile)
      ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        --kernel-name regex:qmatmul python3 "$REPO/benchmarks/profile_cuda.py" 28672 8192 1 \
        0,1,4,2,4,128,0,2 1,1,4,2,8,64,0,7 >"$OUT/ncu-m1.txt" 2>&1
      ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        --kernel-name regex:qmatmul python3 "$REPO/benchmarks/profile_cuda.py" 28672 8192 64 \
        0,4,4,2,3,128,0,1 0,2,2,2,4,128,0,1 >"$OUT/ncu-m64.txt" 2>&1
      echo "ncu: $(grep -c 'qmatmul' "$OUT/ncu-m1.txt") $(grep -c 'qmatmul' "$OUT/ncu-m64.txt") kernels profiled" ;;
    decode-gemv-ncu)  # issue #12: Nsight Compute of the 22-layer decode's GEMV shapes alone (M = 1,
                      # TinyLlama widths: gate/up pairs as 11264 columns, qkv, down, o; the tile
                      # pass's configs): time, DRAM use, occupancy and why warps stall
      M='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,gpu__time_duration.sum,smsp__inst_executed.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size,launch__registers_per_thread,sm__cycles_active.avg,gpc__cycles_elapsed.max'
      for shape in "11264 2048" "2560 2048" "2048 5632" "2048 2048"; do
        timeout 150 ncu --metrics "$M" --kernel-name regex:qmatmul python3 "$REPO/benchmarks/profile_cuda.py" \
          $shape 1 heuristic >>"$OUT/ncu-decode-gemv.txt" 2>&1
      done
      grep -E "qmatmul|stalled|duration|inst_executed|throughput|bytes_read|issue_active|warps_active|grid_size|block_size|registers|cycles" \
        "$OUT/ncu-decode-gemv.txt" | awk '$NF+0 > 0.05 || /qmatmul|duration|inst|throughput|active|grid|block|regis|bytes|cycles/' \
        | sed 's/smsp__average_warps_issue_stalled_//' | cut -c1-150 ;;
    stalls)
      M='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,gpu__time_duration.sum,smsp__inst_executed.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active'
      ncu --metrics "$M" --kernel-name regex:qmatmul python3 "$REPO/benchmarks/profile_cuda.py" 4096 4096 1 \
        1,1,4,2,8,64,0,16 >"$OUT/ncu-stalls.txt" 2>&1
      ncu --metrics "$M" --kernel-name regex:qmatmul python3 "$REPO/benchmarks/profile_cuda.py" 28672 8192 1 \
        1,1,4,2,8,64,0,7 >>"$OUT/ncu-stalls.txt" 2>&1
      ncu --metrics "$M" --kernel-name regex:qmatmul python3 "$REPO/benchmarks/profile_cuda.py" 28672 8192 64 \
        0,4,4,2,3,128,0,1 >>"$OUT/ncu-stalls.txt" 2>&1
      grep -E "qmatmul|stalled|duration|inst_executed|throughput|issue_active|warps_active" "$OUT/ncu-stalls.txt" \
        | awk '$NF+0 > 0.05 || /qmatmul|duration|inst|throughput|active/' | sed 's/smsp__average_warps_issue_stalled_//' ;;
    sweep-small)
      python3 "$REPO/benchmarks/bench_cuda.py" --sweep --ms 1,4,16 --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -20 ;;
    sweep-ms)
      python3 "$REPO/benchmarks/bench_cuda.py" --sweep --ms 1,16,64 --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -22 ;;
    tune)
      python3 "$REPO/benchmarks/tune_smoke_cuda.py" /tmp/qc_tune 2>&1 | tee "$OUT/tune.log" | tail -12 ;;
    sweep)
      python3 "$REPO/benchmarks/bench_cuda.py" --sweep --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -50 ;;
  esac
done
