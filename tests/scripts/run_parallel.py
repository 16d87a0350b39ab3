"""One greedy generation on a multi-worker vLLM, with or without Chimera; prints JSON.

Used by tests/test_vllm_parallel.py in a fresh process per run (the environment must be
set before vLLM starts, and each run gets its own Ray cluster):
    python run_parallel.py TARGET DRAFT|none BACKEND TENSOR_PARALLEL_SIZE
"""
import json
import sys

from vllm import LLM, SamplingParams


def main(target, draft, backend, tp):
    if backend == "ray":  # CPU only: the test-only shim (tests/shims/ray_cpu.py)
        import ray_cpu

        ray_cpu.init_ray(tp)
    prompts = [{"prompt_token_ids": [5 + i, 9, 17, 3 * i + 1, 40][: 2 + i % 4]} for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    # (K fixed: nothing is measured of the test's draft, and by default it would step aside
    # from batch 4 on)
    spec = None if draft == "none" else {"method": "chimera", "model": draft,
                                         "num_speculative_tokens": 4}
    llm = LLM(model=target, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
              max_model_len=256, tensor_parallel_size=tp, distributed_executor_backend=backend,
              speculative_config=spec, disable_log_stats=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    print("RESULT " + json.dumps({
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "accepted": metrics.get("vllm:spec_decode_num_accepted_tokens"),
        "drafts": metrics.get("vllm:spec_decode_num_drafts")}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
