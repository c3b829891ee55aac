"""Autotuning: measure candidate kernel configs on the device, keep the best in a log.

- ``key.kernel_key(node, m)`` / ``key.key_id(key)``: what a tuned config is reused for;
- ``log``: the append-only JSON Lines tuning log and ``best_config`` replay;
- ``device.device_name(target)``: the device identity recorded with every measurement;
- ``errors``: ``BuildError`` / ``WrongResult`` that a backend's ``measure`` raises;
- ``tuner``: search strategies, worker processes, time limits, early stopping, and
  ``tune(model, target, ...)`` (``qcompiler.tune``); ``progress`` and ``plot``: its output.

A backend's tuning module (``qcompiler.codegen.<backend>.tuning``) provides
``search_space``, ``default_config``, ``check_config`` and ``measure`` (the contract in
docs/tuning-log.md); it may add ``build(target, key, config, workdir)``: then the tuner builds each
batch of candidates in parallel worker processes and ``measure`` (one at a time, so that
timings do not disturb each other) finds the build in ``workdir``.

Submodules import lazily so that backends can import ``qcompiler.tuning.errors`` cheaply.
"""
