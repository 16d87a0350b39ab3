"""Measuring and showing Chimera inside vLLM: offline runs (`offline`), the benchmark
(`bench`, `bench_tree`, `step_timing`), the serving storm (`storm`) and the demos (`demo`,
`reference_demo`).

A harness may import the runtime (`vllm_chimera.vllm`), the core and `training` (the
same-budget peers); nothing in the runtime or the core imports a harness.
"""
