"""The Vitis HLS backend: C++ kernels, project scripts and analytical resource estimates."""
