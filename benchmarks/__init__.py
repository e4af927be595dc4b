"""Benchmarks of norm_fast against the literal NORM reference (issue 5).

    make bench                          # quick run on the device present (benchmarks/run.py)
    pytest benchmarks --benchmark-only  # the pytest-benchmark suite (conftest.py options)

Modules: `shapes` (the method's teacher->student shapes and their CPU scaling), `paths`
(which implementations exist here and how each is built), `steps` (inputs and the timed
forward / forward+backward closures), `timing`, `memory` (peak memory per step),
`models` (the ResNet18-style student for the training-step share), `report` (table,
markdown, JSON), `barchart_png` (a dependency-free PNG writer), `run` (make bench).
"""
