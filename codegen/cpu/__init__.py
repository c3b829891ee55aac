"""The CPU backend: each qmatmul becomes a TensorIR function compiled by TVM's LLVM.

``host.py`` maps the host's /proc/cpuinfo flags to an LLVM -mcpu; ``layout.py`` packs weights
into the CPU layouts; ``kernels.py`` builds and schedules the TensorIR (and registers the VNNI
tensor intrinsic); ``runtime.py`` builds, loads and calls the libraries and holds the numpy
model of their numerics; ``backend.py`` is the Backend (artifact and runner); ``tuning.py``
is the tuner's interface (search space, default, measure).
"""
