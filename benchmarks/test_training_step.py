"""NORM's share of a training step: a ResNet18-style student with and without NORM.

`none` is the plain student; every other case puts that NORM path on the last stage
(teacher features: a random tensor of the same shape). Compare the groups' means (or
results.md from `make bench`, which computes the share) for the cost in context.
"""
from __future__ import annotations

from benchmarks import memory, models, paths, shapes, steps, timing


def test_training_step(benchmark, step_case, bench_config, step_config, suite_policy):
    norm_path, dtype = step_case
    device = bench_config.device
    norm = None
    info = {"path": norm_path.name if norm_path else "none", "dtype": dtype,
            "config": step_config.describe(), "batch": step_config.batch}
    if norm_path is not None:
        s = models.Student.last_stage_size(step_config.image_size)
        nshape = shapes.Shape("resnet18-last-stage", step_config.batch, 512, 512, s, s)
        info["backend"], info["algorithm"] = paths.resolved(norm_path, nshape, device.type)
        norm, _ = paths.build_module(norm_path, nshape, device)
    step = models.make_train_step(norm, step_config, device, steps.DTYPES[dtype])
    policy = timing.for_training_step(suite_policy)
    warm = timing.warm_up(step, policy)
    benchmark.group = f"training step {dtype}"
    benchmark.extra_info.update(info)
    # The memory measurement is one more warm call before the timed rounds.
    benchmark.extra_info["peak_mem_bytes"] = memory.peak_step_bytes(step, device)
    benchmark.pedantic(step, rounds=timing.rounds_for(warm, policy), iterations=1,
                       warmup_rounds=0)
    benchmark.extra_info["memory_method"] = memory.method(device)
