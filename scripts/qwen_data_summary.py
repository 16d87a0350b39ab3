"""The Qwen data job's summary (scripts/qwen_data.sh, stage 5): counts, answer tokens and
the sha256 of every file it made -> results/training/qwen-data/summary.json, the stage
summaries copied beside it, and gzipped copies (gzip -n style: no name, no time stamp, so
equal data gives equal bytes) of the prompt and answer files under 5 MB in data/.

    python scripts/qwen_data_summary.py --data ~/.cache/vllm-chimera/data/qwen \
        --results results/training/qwen-data
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import time
from pathlib import Path

FILES = ("prompts/code.jsonl", "prompts/self.jsonl", "prompts/mix.jsonl", "answers.jsonl")
SHIPPED = ("prompts/code.jsonl", "prompts/self.jsonl", "answers.jsonl")  # mix: rebuilt from them
MAX_SHIPPED_BYTES = 5 * (1 << 20)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def complete_lines(path: Path) -> bytes:
    data = path.read_bytes()
    return data[:data.rfind(b"\n") + 1]


def describe(path: Path) -> dict:
    """Lines, bytes, sha256 and the count of each "kind" of a JSONL file (its complete lines
    only: a file being appended to may end in a torn one)."""
    data = complete_lines(path)
    kinds: dict = {}
    for line in data.splitlines():
        if line.strip():
            kind = json.loads(line).get("kind", "?")
            kinds[kind] = kinds.get(kind, 0) + 1
    return {"lines": sum(kinds.values()), "bytes": len(data), "sha256": sha256_of(data),
            "by_kind": dict(sorted(kinds.items()))}


def ship(path: Path, out: Path) -> dict:
    """A gzipped copy of path at out if it is under MAX_SHIPPED_BYTES (else none, and a stale
    copy removed): what was shipped, or why not."""
    packed = gzip.compress(complete_lines(path), compresslevel=9, mtime=0)
    if len(packed) > MAX_SHIPPED_BYTES:
        out.unlink(missing_ok=True)
        return {"shipped": False, "gz_bytes": len(packed),
                "why": "over 5 MB gzipped: scripts/qwen_data.sh regenerates it"}
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.read_bytes() != packed:
        out.write_bytes(packed)
    return {"shipped": True, "gz": f"data/{out.name}", "gz_bytes": len(packed),
            "gz_sha256": sha256_of(packed)}


def stage_summaries(data: Path, results: Path) -> None:
    """Copy the stages' own summaries beside summary.json (paths cut to file names)."""
    for name in FILES[:3]:
        src = data / f"{name}.summary.json"
        if src.is_file():
            summary = json.loads(src.read_text())
            if "sources" in summary and isinstance(summary["sources"], dict):
                summary["sources"] = {k: Path(v).name for k, v in summary["sources"].items()}
            summary.pop("path", None)
            out = results / f"{Path(name).stem}.summary.json"
            out.write_text(json.dumps(summary, indent=2) + "\n")
            if name in SHIPPED:  # restored with the data (qwen_data.sh restore)
                (results / "data" / f"{Path(name).name}.summary.json").parent.mkdir(exist_ok=True)
                (results / "data" / f"{Path(name).name}.summary.json").write_text(src.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="<cache>/data/qwen")
    p.add_argument("--results", required=True, help="results/training/qwen-data")
    args = p.parse_args()
    data, results = Path(args.data), Path(args.results)
    files = {}
    for name in FILES:
        if (data / name).is_file():
            files[name] = describe(data / name)
            if name in SHIPPED:
                files[name].update(ship(data / name, results / "data" / f"{Path(name).name}.gz"))
    stage_summaries(data, results)
    answers = results / "answers.summary.json"
    summary = {"updated": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files}
    if answers.is_file():
        a = json.loads(answers.read_text())
        summary["answers"] = {k: a.get(k) for k in ("answers", "answer_tokens", "seconds",
                                                    "truncated", "unaccounted", "max_tokens")}
        summary["answers"]["tokens_per_s"] = round(a["answer_tokens"] / max(a["seconds"], 1e-9), 1)
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary -> {results / 'summary.json'}: " +
          ", ".join(f"{Path(k).name} {v['lines']} lines" for k, v in files.items()), flush=True)


if __name__ == "__main__":
    main()
