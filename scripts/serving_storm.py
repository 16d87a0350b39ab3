"""The full serving storm (tests/test_serving_load.py runs a short one in CI): SmolLM2 with
its shipped draft behind `vllm-chimera serve`, a plain server as the reference, N mixed
requests `--concurrency` at a time, twice; writes results/serving/storm.json, parity.md and
README's request-parity table (between its parity markers).

    .venv/bin/python scripts/serving_storm.py                 # 256 requests, 64 at a time
    .venv/bin/python scripts/serving_storm.py --num-requests 64 --no-readme
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from vllm_chimera.prepare.targets import prepare_target
from vllm_chimera.harness import storm

HERE = Path(__file__).resolve().parent.parent
ENGINE = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--speculative-config", default='{"method": "chimera"}',
                        help="Chimera's settings (default: the draft's own: schedule, lookup)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "serving")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    target = prepare_target("smollm2")
    engine = ENGINE + ["--max-model-len", str(args.max_model_len)]
    args.output.mkdir(parents=True, exist_ok=True)
    rounds, memory = [], []
    with storm.Server(target, engine + ["--speculative-config", args.speculative_config],
                      args.output / "chimera-server.log") as server:
        requests = storm.build_requests(server.model(), args.num_requests, args.max_model_len)
        for _ in range(2):  # the second, identical storm shows whether memory keeps growing
            start = time.perf_counter()
            rounds.append(storm.storm(server.base, requests, args.concurrency))
            print(f"chimera storm: {time.perf_counter() - start:.0f} s", flush=True)
            memory.append(storm.resident_mib(server.process.pid))
        healthy = server.healthy()
    with storm.Server(target, engine, args.output / "plain-server.log") as plain_server:
        plain = storm.storm(plain_server.base, requests, args.concurrency)
    found = {"plain": storm.problems(requests, plain),
             "chimera": [p for results in rounds for p in storm.problems(requests, results, plain)]}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "command": "python scripts/serving_storm.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k in ("num_requests", "concurrency", "speculative_config")),
        "num_requests": len(requests), "concurrency": args.concurrency,
        "healthy_after": healthy, "resident_mib_after_each_storm": memory,
        "problems": found, "summary": storm.summary(requests, rounds[0]),
        "plain_summary": storm.summary(requests, plain)}
    (args.output / "storm.json").write_text(json.dumps(report, indent=1) + "\n")
    table = storm.parity_table(requests, rounds[0], plain)
    header = (f"Made by `{report['command']}` on {report['date'][:10]} ({report['machine']}): "
              f"{len(requests)} requests, {args.concurrency} at a time, twice; server healthy "
              f"after: {'yes' if healthy else 'NO'}; resident memory after each storm: "
              f"{memory[0]:.0f} / {memory[1]:.0f} MiB; problems: "
              f"{len(found['chimera'])} (plain: {len(found['plain'])}).\n\n")
    (args.output / "parity.md").write_text(header + table)
    if not args.no_readme:
        readme = HERE / "README.md"
        text = readme.read_text()
        block = f"<!-- parity:begin -->\n{header}{table}<!-- parity:end -->"
        text, count = re.subn(r"<!-- parity:begin -->.*?<!-- parity:end -->", lambda _: block,
                              text, flags=re.S)
        if count:
            readme.write_text(text)
    print(header + table)
    for line in found["plain"] + found["chimera"]:
        print("problem:", line)
    return 0 if not found["chimera"] and healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
