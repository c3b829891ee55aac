/* qc_call: call one function of a TVM-compiled (cross-compiled) kernel library, without TVM.
 *
 *   qc_call LIB FUNC IN_FILE OUT_FILE
 *
 * Built with aarch64-linux-gnu-gcc and run under qemu-aarch64, it lets tests/test_cpu_arm.py
 * check the Arm targets' code for correctness on an x86 host. LIB is the library that
 * export_library wrote; FUNC a function of it (qmm_v0 ...), called through the TVM FFI
 * packed calling convention: ``int __tvm_ffi_FUNC(void *self, const TVMFFIAny *args,
 * int32_t num_args, TVMFFIAny *result)`` with every tensor passed as a DLTensor pointer.
 *
 * The few runtime symbols the generated code needs are provided here, as the TVM runtime
 * would: libm (loaded globally first), the error setter it imports (exported from this executable, -rdynamic), and the
 * backend function pointers it reads (__TVMBackendParallelLaunch, workspace alloc/free),
 * set after dlopen. Parallel loops run serially, task by task, with QC_TASKS tasks (default
 * 3) when the code lets the runtime choose: results must not depend on the task count.
 *
 * IN_FILE (little-endian): "QCA1", int32 nargs, then per argument: int32 kind (0 tensor,
 * 1 int64 scalar), and for a tensor uint8 dtype code, uint8 bits, uint16 lanes, int32 ndim,
 * int64 shape[ndim], int64 nbytes, the bytes; for a scalar its int64.
 * OUT_FILE: the bytes of every tensor argument after the call, in argument order.
 * Exit status: 0 done, 1 bad usage or input, 2 the function reported an error (on stderr).
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* dlpack.h and tvm/ffi/c_api.h, the parts used here (their ABI is fixed) */
typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;
typedef struct {
    int32_t type_index;
    uint32_t zero_padding;
    union { int64_t v_int64; double v_float64; void *v_ptr; } v;
} TVMFFIAny;
enum { kTVMFFINone = 0, kTVMFFIInt = 1, kTVMFFIDLTensorPtr = 7, kDLCPU = 1 };
typedef int (*SafeCall)(void *, const TVMFFIAny *, int32_t, TVMFFIAny *);
typedef struct { void *sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*ParallelLambda)(int task_id, TVMParallelGroupEnv *env, void *cdata);

static char last_error[4096];

/* Imported by the generated code to report an error (a failed shape or type check ...). */
void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t n) {
    size_t used = (size_t)snprintf(last_error, sizeof last_error, "%s: ", kind ? kind : "Error");
    for (int32_t i = 0; i < n && used < sizeof last_error; i++)
        if (parts[i]) used += (size_t)snprintf(last_error + used, sizeof last_error - used, "%s",
                                               parts[i]);
}

static int serial_parallel_launch(ParallelLambda f, void *cdata, int num_task) {
    if (num_task <= 0) {
        const char *env = getenv("QC_TASKS");
        num_task = env ? atoi(env) : 3;
        if (num_task <= 0) num_task = 1;
    }
    TVMParallelGroupEnv penv = {NULL, num_task};
    for (int i = 0; i < num_task; i++) {
        int rc = f(i, &penv, cdata);
        if (rc != 0) return rc;
    }
    return 0;
}

static int parallel_barrier(int task_id, TVMParallelGroupEnv *penv) {
    (void)task_id; (void)penv;
    return 0;  /* tasks run one after another: every earlier one is done */
}

static void *alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
    (void)device_type; (void)device_id; (void)code; (void)bits;
    void *p = NULL;
    return posix_memalign(&p, 64, nbytes ? nbytes : 1) == 0 ? p : NULL;
}

static int free_workspace(int device_type, int device_id, void *ptr) {
    (void)device_type; (void)device_id;
    free(ptr);
    return 0;
}

static void set_pointer(void *lib, const char *name, void *value) {
    void **slot = (void **)dlsym(lib, name);
    if (slot) *slot = value;
}

static int read_exact(FILE *f, void *dst, size_t n) { return fread(dst, 1, n, f) == n; }

static int fail(const char *what) {
    fprintf(stderr, "qc_call: %s\n", what);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 5) return fail("usage: qc_call LIB FUNC IN_FILE OUT_FILE");
    /* The op library calls libm (erf, exp ...) without linking it: the TVM runtime's
     * process has it loaded; here it is loaded globally before the library. */
    if (!dlopen("libm.so.6", RTLD_NOW | RTLD_GLOBAL)) return fail(dlerror());
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) return fail(dlerror());
    set_pointer(lib, "__TVMBackendParallelLaunch", (void *)serial_parallel_launch);
    set_pointer(lib, "__TVMBackendParallelBarrier", (void *)parallel_barrier);
    set_pointer(lib, "__TVMBackendAllocWorkspace", (void *)alloc_workspace);
    set_pointer(lib, "__TVMBackendFreeWorkspace", (void *)free_workspace);
    char symbol[512];
    snprintf(symbol, sizeof symbol, "__tvm_ffi_%s", argv[2]);
    SafeCall fn = (SafeCall)dlsym(lib, symbol);
    if (!fn) return fail("no such function in the library");

    FILE *in = fopen(argv[3], "rb");
    if (!in) return fail("cannot open IN_FILE");
    char magic[4];
    int32_t nargs;
    if (!read_exact(in, magic, 4) || memcmp(magic, "QCA1", 4) || !read_exact(in, &nargs, 4)
        || nargs < 0 || nargs > 64)
        return fail("IN_FILE: bad header");
    TVMFFIAny args[64];
    DLTensor tensors[64];
    int64_t nbytes[64];
    memset(args, 0, sizeof args);
    memset(tensors, 0, sizeof tensors);
    for (int32_t i = 0; i < nargs; i++) {
        int32_t kind;
        if (!read_exact(in, &kind, 4)) return fail("IN_FILE: truncated");
        if (kind == 1) {
            args[i].type_index = kTVMFFIInt;
            if (!read_exact(in, &args[i].v.v_int64, 8)) return fail("IN_FILE: truncated");
            nbytes[i] = -1;
            continue;
        }
        if (kind != 0) return fail("IN_FILE: unknown argument kind");
        DLTensor *t = &tensors[i];
        if (!read_exact(in, &t->dtype, 4) || !read_exact(in, &t->ndim, 4) || t->ndim < 0
            || t->ndim > 16)
            return fail("IN_FILE: bad tensor header");
        t->shape = calloc((size_t)t->ndim + 1, sizeof(int64_t));
        if (!read_exact(in, t->shape, 8 * (size_t)t->ndim) || !read_exact(in, &nbytes[i], 8)
            || nbytes[i] < 0)
            return fail("IN_FILE: bad tensor shape");
        if (posix_memalign(&t->data, 64, nbytes[i] ? (size_t)nbytes[i] : 1))
            return fail("out of memory");
        if (!read_exact(in, t->data, (size_t)nbytes[i])) return fail("IN_FILE: truncated data");
        t->device.device_type = kDLCPU;
        args[i].type_index = kTVMFFIDLTensorPtr;
        args[i].v.v_ptr = t;
    }
    fclose(in);

    TVMFFIAny result;
    memset(&result, 0, sizeof result);
    result.type_index = kTVMFFINone;
    if (fn(NULL, args, nargs, &result) != 0) {
        fprintf(stderr, "qc_call: %s failed: %s\n", argv[2], last_error);
        return 2;
    }
    FILE *out = fopen(argv[4], "wb");
    if (!out) return fail("cannot open OUT_FILE");
    for (int32_t i = 0; i < nargs; i++)
        if (nbytes[i] >= 0 && fwrite(tensors[i].data, 1, (size_t)nbytes[i], out) != (size_t)nbytes[i])
            return fail("OUT_FILE: write failed");
    fclose(out);
    return 0;
}
