// Empty: emulator.h (beside it) defines what the op kernels use of the CUDA runtime.
