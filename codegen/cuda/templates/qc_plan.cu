// qcompiler CUDA plan launcher: runs a whole model's step table on one stream and captures it
// as a CUDA graph. Not generated: the plan is data (codegen/cuda/plan.py builds the table once
// per input signature), so one small library serves every model and its build is cached.
//
// A step is one of
//   QC_STEP_OP    an op kernel of cuda_ops.so:  int fn(void* const* ptrs, const int64_t* shapes,
//                                                     void* workspace, cudaStream_t)
//   QC_STEP_QMM   a qmatmul library's _run:     int fn(x, y, w, scales, zeros, bias, perm,
//                                                     int m, void* workspace, cudaStream_t,
//                                                     int variant, void* const* extras)
//                 (ptrs[0..6] in that order; extras = ptrs + 7 when the step's epilogue flag
//                 is set: the kernel applies its fused epilogue with them, else null)
//   QC_STEP_COPY  cudaMemcpyAsync(ptrs[1], ptrs[0], bytes, device to device)
#include <cuda_runtime.h>
#include <stdint.h>

enum { QC_STEP_OP = 0, QC_STEP_QMM = 1, QC_STEP_COPY = 2 };

struct QcStep {          // the layout codegen/cuda/plan.py's ctypes Structure mirrors
  int64_t kind;
  void* fn;
  void* const* ptrs;
  const int64_t* shapes;
  void* workspace;
  int64_t m;             // QMM: rows; COPY: bytes
  int64_t variant;       // QMM: -1 = by M
  int64_t epilogue;      // QMM: 1 = the kernel applies its epilogue (extras at ptrs + 7)
};

typedef int (*qc_op_fn)(void* const*, const int64_t*, void*, cudaStream_t);
typedef int (*qc_qmm_fn)(void*, void*, void*, void*, void*, void*, void*, int, void*,
                         cudaStream_t, int, void* const*);

extern "C" {

// Launches every step; returns the first error and the failing step's index in *failed.
int qc_plan_launch(const QcStep* steps, int64_t n, void* stream, int64_t* failed) {
  cudaStream_t s = (cudaStream_t)stream;
  for (int64_t i = 0; i < n; ++i) {
    const QcStep& st = steps[i];
    int err = 0;
    if (st.kind == QC_STEP_OP) {
      err = ((qc_op_fn)st.fn)(st.ptrs, st.shapes, st.workspace, s);
    } else if (st.kind == QC_STEP_QMM) {
      void* const* p = st.ptrs;
      err = ((qc_qmm_fn)st.fn)(p[0], p[1], p[2], p[3], p[4], p[5], p[6], (int)st.m,
                               st.workspace, s, (int)st.variant,
                               st.epilogue ? p + 7 : nullptr);
    } else if (st.kind == QC_STEP_COPY) {
      if (st.m) err = (int)cudaMemcpyAsync(st.ptrs[1], st.ptrs[0], (size_t)st.m,
                                           cudaMemcpyDeviceToDevice, s);
    } else {
      err = (int)cudaErrorInvalidValue;
    }
    if (err == 0) err = (int)cudaPeekAtLastError();
    if (err) {
      if (failed) *failed = i;
      return err;
    }
  }
  return 0;
}

// Captures the steps into an executable graph (*exec); nothing runs until qc_graph_launch.
int qc_plan_capture(const QcStep* steps, int64_t n, void* stream, void** exec,
                    int64_t* failed) {
  cudaStream_t s = (cudaStream_t)stream;
  cudaGraph_t graph = nullptr;
  int err = (int)cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  if (err) return err;
  int launch_err = qc_plan_launch(steps, n, stream, failed);
  err = (int)cudaStreamEndCapture(s, &graph);
  if (launch_err) {
    if (graph) cudaGraphDestroy(graph);
    return launch_err;
  }
  if (err) return err;
  cudaGraphExec_t ge = nullptr;
  err = (int)cudaGraphInstantiate(&ge, graph, 0);
  cudaGraphDestroy(graph);
  if (err) return err;
  *exec = (void*)ge;
  return 0;
}

int qc_graph_launch(void* exec, void* stream) {
  return (int)cudaGraphLaunch((cudaGraphExec_t)exec, (cudaStream_t)stream);
}
int qc_graph_destroy(void* exec) { return (int)cudaGraphExecDestroy((cudaGraphExec_t)exec); }

int qc_stream_create(void** stream) {
  return (int)cudaStreamCreateWithFlags((cudaStream_t*)stream, cudaStreamNonBlocking);
}
int qc_stream_synchronize(void* stream) {
  return (int)cudaStreamSynchronize((cudaStream_t)stream);
}
int qc_copy_async(void* dst, const void* src, size_t bytes, int kind, void* stream) {
  return (int)cudaMemcpyAsync(dst, src, bytes, (cudaMemcpyKind)kind, (cudaStream_t)stream);
}
}
