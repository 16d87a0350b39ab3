"""Target + Chimera on several GPUs / nodes through vLLM's Ray executor.

    ray start --head                          # on the head node; `ray start --address=...` on others
    python examples/ray_chimera.py TARGET DRAFT --tensor-parallel-size 4

Written for GPU clusters with upstream vLLM 0.32 (`pip install "vllm==0.32.*" vllm-chimera`
on every node: the plugin loads in every Ray worker through vLLM's plugin entry point).
The draft is tensor-parallel like the target (pipeline parallelism is refused for now:
the trigram encoder needs the target's embedding on the last stage). vLLM's CPU
platform refuses Ray; the test suite exercises this path on CPU through a test-only shim
(tests/shims/ray_cpu.py), with tensor parallelism 2.
"""
import argparse

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--num-tokens", type=int, default=None)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    spec = {"method": "chimera", "model": args.draft}
    if args.num_tokens is not None:
        spec["num_speculative_tokens"] = args.num_tokens
    llm = LLM(model=args.target, distributed_executor_backend="ray",
              tensor_parallel_size=args.tensor_parallel_size,
              speculative_config=spec, disable_log_stats=False)
    outputs = llm.generate(["The three laws of robotics are"], SamplingParams(max_tokens=128))
    print(outputs[0].outputs[0].text)
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            print(metric.name, getattr(metric, "value", getattr(metric, "values", None)))
