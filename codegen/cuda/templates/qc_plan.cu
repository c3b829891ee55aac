// qcompiler CUDA plan launcher: runs a whole model's step table on one stream and captures it
// as a CUDA graph. Not generated: the plan is data (codegen/cuda/plan.py builds the table once
// per input signature), so one small library serves every model and its build is cached.
//
// A step is one of
//   QC_STEP_OP    an op kernel of cuda_ops.so:  int fn(void* const* ptrs, const int64_t* shapes,
//                                                     void* workspace, cudaStream_t)
//   QC_STEP_QMM   a qmatmul library's _run:     int fn(x, y, w, scales, zeros, bias, perm,
//                                                     norm_w, norm_b, int m, void* workspace,
//                                                     cudaStream_t, int variant,
//                                                     void* const* extras)
//                 (ptrs[0..8] in that order; extras = ptrs + 9 when the step's epilogue flag
//                 is set: the kernel applies its fused epilogue with them, else null)
//   QC_STEP_COPY  cudaMemcpyAsync(ptrs[1], ptrs[0], bytes, device to device)
//
// Concurrent steps: a step whose `concurrent` field is g > 1 starts a run of g steps that
// neither read nor write what another of them writes (plan.py decides it from the buffers'
// addresses). The first runs on the plan's stream, the others on the lanes' side streams,
// forked from it and joined back by events; captured, they become parallel branches of the
// graph. Small kernels of one layer (the q, k and v projections, their rotary embeddings)
// then share the GPU instead of each leaving most of it idle. Without lanes (null) the steps
// run one after another.
#include <cuda_runtime.h>
#include <stdint.h>

#define QC_MAX_LANES 4  // codegen/cuda/plan.py MAX_LANES: steps launched concurrently

enum { QC_STEP_OP = 0, QC_STEP_QMM = 1, QC_STEP_COPY = 2 };

struct QcStep {          // the layout codegen/cuda/plan.py's ctypes Structure mirrors
  int64_t kind;
  void* fn;
  void* const* ptrs;
  const int64_t* shapes;
  void* workspace;
  int64_t m;             // QMM: rows; COPY: bytes
  int64_t variant;       // QMM: -1 = by M
  int64_t epilogue;      // QMM: 1 = the kernel applies its epilogue (extras at ptrs + 9)
  int64_t concurrent;    // > 1: this step and the next concurrent - 1 run concurrently
};

// Side streams and events of one runner (the plan's stream is lane 0).
struct QcLanes {
  cudaStream_t side[QC_MAX_LANES - 1];
  cudaEvent_t fork;
  cudaEvent_t join[QC_MAX_LANES - 1];
};

typedef int (*qc_op_fn)(void* const*, const int64_t*, void*, cudaStream_t);
typedef int (*qc_qmm_fn)(void*, void*, void*, void*, void*, void*, void*, void*, void*, int,
                         void*, cudaStream_t, int, void* const*);

static int launch_step(const QcStep& st, cudaStream_t s) {
  int err = 0;
  if (st.kind == QC_STEP_OP) {
    err = ((qc_op_fn)st.fn)(st.ptrs, st.shapes, st.workspace, s);
  } else if (st.kind == QC_STEP_QMM) {
    void* const* p = st.ptrs;
    err = ((qc_qmm_fn)st.fn)(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], (int)st.m,
                             st.workspace, s, (int)st.variant, st.epilogue ? p + 9 : nullptr);
  } else if (st.kind == QC_STEP_COPY) {
    if (st.m) err = (int)cudaMemcpyAsync(st.ptrs[1], st.ptrs[0], (size_t)st.m,
                                         cudaMemcpyDeviceToDevice, s);
  } else {
    err = (int)cudaErrorInvalidValue;
  }
  if (err == 0) err = (int)cudaPeekAtLastError();
  return err;
}

extern "C" {

int qc_lanes_create(void** lanes) {
  QcLanes* l = new QcLanes();  // value-initialized: null handles until created
  int err = (int)cudaEventCreateWithFlags(&l->fork, cudaEventDisableTiming);
  for (int j = 0; j < QC_MAX_LANES - 1 && !err; ++j) {
    err = (int)cudaStreamCreateWithFlags(&l->side[j], cudaStreamNonBlocking);
    if (!err) err = (int)cudaEventCreateWithFlags(&l->join[j], cudaEventDisableTiming);
  }
  if (err) {  // release what was created
    for (int j = 0; j < QC_MAX_LANES - 1; ++j) {
      if (l->side[j]) cudaStreamDestroy(l->side[j]);
      if (l->join[j]) cudaEventDestroy(l->join[j]);
    }
    if (l->fork) cudaEventDestroy(l->fork);
    delete l;
    return err;
  }
  *lanes = (void*)l;
  return 0;
}

// Launches every step; returns the first error and the failing step's index in *failed.
// lanes: from qc_lanes_create, or null (concurrent steps then run one after another).
int qc_plan_launch(const QcStep* steps, int64_t n, void* stream, void* lanes,
                   int64_t* failed) {
  cudaStream_t s = (cudaStream_t)stream;
  QcLanes* l = (QcLanes*)lanes;
  // launch_step peeks at the thread's last error after each launch: clear what an earlier
  // call left there (its caller had its return code), or the first launch would be blamed
  // for it. A sticky error (a fault on the device) stays and is still reported.
  (void)cudaGetLastError();
  for (int64_t i = 0; i < n; ++i) {
    int err = 0;
    int64_t at = i;  // the step being launched (reported on error)
    const int64_t g = steps[i].concurrent;
    if (l && g > 1 && g <= QC_MAX_LANES && i + g <= n) {
      // fork: every side lane waits for the work so far; join: the stream waits for them
      err = (int)cudaEventRecord(l->fork, s);
      for (int64_t j = 1; j < g && !err; ++j) {
        at = i + j;
        err = (int)cudaStreamWaitEvent(l->side[j - 1], l->fork, 0);
        if (!err) err = launch_step(steps[i + j], l->side[j - 1]);
        if (!err) err = (int)cudaEventRecord(l->join[j - 1], l->side[j - 1]);
      }
      if (!err) {
        at = i;
        err = launch_step(steps[i], s);
      }
      for (int64_t j = 1; j < g && !err; ++j) err = (int)cudaStreamWaitEvent(s, l->join[j - 1], 0);
      i += g - 1;
    } else {
      err = launch_step(steps[i], s);
    }
    if (err) {
      if (failed) *failed = at;
      return err;
    }
  }
  return 0;
}

// Captures the steps into an executable graph (*exec); nothing runs until qc_graph_launch.
int qc_plan_capture(const QcStep* steps, int64_t n, void* stream, void* lanes, void** exec,
                    int64_t* failed) {
  cudaStream_t s = (cudaStream_t)stream;
  cudaGraph_t graph = nullptr;
  int err = (int)cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  if (err) return err;
  int launch_err = qc_plan_launch(steps, n, stream, lanes, failed);
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
int qc_event_create(void** event) {
  return (int)cudaEventCreateWithFlags((cudaEvent_t*)event, cudaEventDisableTiming);
}
// `waiter` waits for the work queued on `waited` so far; the host does not (a run() on torch
// tensors is ordered with the caller's stream this way, both at its start and its end).
int qc_stream_wait(void* waiter, void* waited, void* event) {
  int err = (int)cudaEventRecord((cudaEvent_t)event, (cudaStream_t)waited);
  return err ? err : (int)cudaStreamWaitEvent((cudaStream_t)waiter, (cudaEvent_t)event, 0);
}
int qc_copy_async(void* dst, const void* src, size_t bytes, int kind, void* stream) {
  return (int)cudaMemcpyAsync(dst, src, bytes, (cudaMemcpyKind)kind, (cudaStream_t)stream);
}
// `height` rows of `width` bytes, `spitch` apart at src and `dpitch` apart at dst (a KV cache
// into or out of buffers laid out for a capacity: codegen/cuda/cache_capacity.py)
int qc_copy2d_async(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                    size_t height, int kind, void* stream) {
  return (int)cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, (cudaMemcpyKind)kind,
                                (cudaStream_t)stream);
}
}
