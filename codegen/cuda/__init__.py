"""The CUDA backend: packed mma-fragment weight layout, jinja2 CUDA C++ templates, nvcc, and a
ctypes runtime (see NOTES.md beside this file)."""
