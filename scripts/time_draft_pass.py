"""Time the Chimera draft's encoder pass inside vLLM, eager against compiled.

The encoder pass (trigram encoder, fuse, context layer, norm: ChimeraEncoder) is what vLLM
compiles; the heads run outside it. This starts one engine per mode, each in a fresh
process (see vllm_chimera.harness.bench), generates greedily, and times every encoder pass and
every whole proposal (encoder + heads + lookup) that the engine runs while generating
(start-up warm-up passes are not counted):

    python scripts/time_draft_pass.py                      # SmolLM2 + its shipped draft
    python scripts/time_draft_pass.py --modes compiled --batch-size 4
    python scripts/time_draft_pass.py --target DIR --draft DIR --output timing.json

Modes: "eager" is enforce_eager=True (nothing compiled, vLLM's custom CPU/GPU ops),
"compiled" is vLLM's default (compile mode on CPU; on GPU also the draft's piecewise CUDA
graphs). With --paired, the compiled engine runs every encoder pass a second time
uncompiled (ChimeraEncoder.forward called directly: the same code as before the draft was
compiled, in the same engine), in alternating order, and times both: a paired comparison
that a busy machine disturbs far less than two engines measured minutes apart. (Running
the pass twice is harmless: the second writes the same keys and values to the same
slots; but that run's per-pass and per-proposal figures then include both passes.)

On a GPU every timed call is bracketed by torch.cuda.synchronize(), which itself costs
time: compare the figures with each other, not with an unsynchronised run. On a shared CPU
the figures move between runs: repeat with --rounds and read the medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
DEFAULT_DRAFT = HERE / "vllm_chimera" / "drafts" / "smollm2-chimera"
PROMPTS = [  # short, varied English prompts (not a benchmark's test prompts)
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "List five tips for learning to play the guitar as an adult.",
    "What are the main differences between a lake and a pond?",
    "Describe a good morning routine for a busy student.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Why do leaves change colour in autumn?",
    "Give me a recipe for a simple vegetable soup.",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2", help="target folder, or 'smollm2' (prepared)")
    p.add_argument("--draft", default=str(DEFAULT_DRAFT), help="Chimera draft folder")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1, help="prompts sent at a time")
    p.add_argument("--rounds", type=int, default=1, help="every mode this many times")
    p.add_argument("--paired", action="store_true",
                   help="compiled mode: also time each pass uncompiled, in the same engine")
    p.add_argument("--output", help="write every run's figures here as JSON")
    p.add_argument("--one-run", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _target_folder(name: str) -> str:
    if Path(name).is_dir():
        return name
    from vllm_chimera.prepare.cache import target_dir

    folder = target_dir(name)
    if not (folder / "config.json").is_file():
        sys.exit(f"target {name!r} is not prepared: chimera-prepare target {name}")
    return str(folder)


class _Timer:
    """Wall time of every encoder pass and proposal made while generating."""

    def __init__(self, paired: bool):
        import torch

        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.encoder_ms: list[float] = []
        self.encoder_rows: list[int] = []
        self.propose_ms: list[float] = []
        self.paired_ms: dict[str, list[float]] = {"uncompiled": [], "compiled": []}
        self.in_propose = False
        self.paired = paired

    def timed(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) and its wall time in ms."""
        self.sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        return out, 1000 * (time.perf_counter() - start)

    def install(self):
        from vllm_chimera.vllm.model import ChimeraDraftForVLLM, ChimeraEncoder
        from vllm_chimera.vllm.proposer import ChimeraProposer

        forward, propose, timer = ChimeraDraftForVLLM.forward, ChimeraProposer.propose, self
        call_encoder = ChimeraEncoder.__call__  # support_torch_compile's: the compiled graph

        def timed_forward(model, *args, **kwargs):
            if not timer.in_propose:  # start-up warm-up (and compilation): not counted
                return forward(model, *args, **kwargs)
            out, ms = timer.timed(forward, model, *args, **kwargs)
            timer.encoder_ms.append(ms)
            timer.encoder_rows.append(out.shape[0])
            return out

        def paired_call(encoder, *args, **kwargs):
            if not (timer.paired and timer.in_propose) or getattr(encoder, "do_not_compile", True):
                return call_encoder(encoder, *args, **kwargs)
            runs = [("uncompiled", ChimeraEncoder.forward), ("compiled", call_encoder)]
            if len(timer.paired_ms["compiled"]) % 2:  # alternate which one goes first
                runs.reverse()
            for name, fn in runs:
                out, ms = timer.timed(fn, encoder, *args, **kwargs)
                timer.paired_ms[name].append(ms)
                if name == "compiled":
                    result = out
            return result

        def timed_propose(proposer, *args, **kwargs):
            timer.in_propose = True
            timer.sync()
            start = time.perf_counter()
            try:
                return propose(proposer, *args, **kwargs)
            finally:
                timer.sync()
                timer.propose_ms.append(1000 * (time.perf_counter() - start))
                timer.in_propose = False

        ChimeraDraftForVLLM.forward = timed_forward
        ChimeraProposer.propose = timed_propose
        ChimeraEncoder.__call__ = paired_call


def one_run(args) -> dict:
    """One engine in this process: the figures of one mode."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the patches must reach it
    from vllm import LLM, SamplingParams

    from vllm_chimera.harness.offline import ENGINE_DEFAULTS

    timer = _Timer(args.paired)
    timer.install()
    engine = dict(ENGINE_DEFAULTS, enforce_eager=args.one_run == "eager")
    start = time.perf_counter()
    llm = LLM(model=_target_folder(args.target), **engine,
              speculative_config={"method": "chimera", "model": args.draft})
    startup = time.perf_counter() - start
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start, num_tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), args.batch_size):
        for output in llm.generate(prompts[i:i + args.batch_size], params, use_tqdm=False):
            num_tokens += len(output.outputs[0].token_ids)
    seconds = time.perf_counter() - start
    return {
        "mode": args.one_run, "batch_size": args.batch_size, "startup_seconds": round(startup, 1),
        "num_encoder_passes": len(timer.encoder_ms),
        "encoder_ms_median": statistics.median(timer.encoder_ms or [0.0]),
        "encoder_ms_mean": statistics.fmean(timer.encoder_ms or [0.0]),
        "encoder_rows_mean": statistics.fmean(timer.encoder_rows or [0]),
        "propose_ms_median": statistics.median(timer.propose_ms or [0.0]),
        **{f"paired_{name}_ms_median": statistics.median(times)
           for name, times in timer.paired_ms.items() if times},
        "tokens_per_second": num_tokens / seconds,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.one_run:
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    forwarded = list(argv if argv is not None else sys.argv[1:])
    runs = []
    for _ in range(args.rounds):
        for mode in modes:  # a fresh process per engine
            proc = subprocess.run([sys.executable, __file__, *forwarded, "--one-run", mode],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs.append(json.loads(lines[-1][len("RESULT "):]))
            run = runs[-1]
            print(f"{mode:8s} encoder pass {run['encoder_ms_median']:.2f} ms median "
                  f"({run['encoder_ms_mean']:.2f} mean, {run['encoder_rows_mean']:.1f} rows, "
                  f"{run['num_encoder_passes']} passes); whole proposal "
                  f"{run['propose_ms_median']:.2f} ms median; {run['tokens_per_second']:.1f} tok/s",
                  flush=True)
            if "paired_compiled_ms_median" in run:
                print(f"{'':8s} same passes, paired: uncompiled "
                      f"{run['paired_uncompiled_ms_median']:.2f} ms, compiled "
                      f"{run['paired_compiled_ms_median']:.2f} ms (medians)", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
