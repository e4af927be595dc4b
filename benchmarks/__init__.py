"""Benchmarks of norm_fast against the literal NORM reference.

    make bench                          # tables, JSON and plots (benchmarks/run.py)
    pytest benchmarks --benchmark-only  # the pytest-benchmark suite (conftest.py options)

Modules: `shapes` (the method's teacher->student shapes and paper batches), `paths` (which
implementations exist here and how each is built), `steps` (inputs and the timed forward /
forward+backward closures), `timing`, `memory` (peak memory per step), `plan` (probes and
the batches that fit the time budget), `measure` (one group of paths at one shape),
`sweeps` (the N and batch sweeps, the cost model's prediction), `models` (the
ResNet18-style student for the training-step share), `report` (tables, markdown, JSON),
`plots` (matplotlib figures), `progress` (tqdm bar), `run` (make bench).
"""
