"""bf16 against fp32 for training on this CPU (issue 14, results/training/recipe-pilots/bf16).

Two questions decide whether `--cache-precision bf16 --autocast bf16` is worth it here:
  1. does the target's bf16 forward give the same training labels (greedy next tokens) and
     hidden states as fp32, and how much faster is it? (held-out answers, one at a time)
  2. how much cheaper is one draft micro-batch step (forward + backward + AdamW) under bf16
     autocast, with and without the loss on a quarter of the positions?

    .venv/bin/python scripts/measure_precision.py --threads 2 \
        --output results/training/recipe-pilots/bf16/precision.json

Timings are medians over repeats inside one process, so the fp32/bf16 ratios are side by side.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vllm_chimera.training import trainer
from vllm_chimera.training.data import load_sequences, target_outputs
from vllm_chimera.training.loss import position_seeds
from vllm_chimera.training.settings import TrainingSettings

CACHE = Path.home() / ".cache" / "vllm-chimera"


def label_agreement(target, tokenizer, answers: Path, max_sequences: int) -> dict:
    """Greedy labels and hidden states of the bf16 target forward against fp32."""
    sequences = load_sequences(str(answers), tokenizer, 512, None)[:max_sequences]
    same = total = same_answer = total_answer = 0
    cosines, seconds = [], {"fp32": 0.0, "bf16": 0.0}
    with torch.no_grad():
        for ids, mask in sequences:
            input_ids = torch.tensor([ids])  # [1, num_tokens]
            attention = torch.ones_like(input_ids)
            start = time.perf_counter()
            hidden, greedy, _ = target_outputs(target, input_ids, attention)
            seconds["fp32"] += time.perf_counter() - start
            with torch.autocast("cpu", dtype=torch.bfloat16):
                start = time.perf_counter()
                hidden_bf16, greedy_bf16, _ = target_outputs(target, input_ids, attention)
                seconds["bf16"] += time.perf_counter() - start
            agree = (greedy == greedy_bf16)[0]  # [num_tokens]
            answer = torch.tensor(mask, dtype=torch.bool)
            same += int(agree.sum()); total += agree.numel()
            same_answer += int(agree[answer].sum()); total_answer += int(answer.sum())
            cosines.append(torch.nn.functional.cosine_similarity(
                hidden[0].float(), hidden_bf16[0].float(), dim=-1).mean().item())
    return {"num_sequences": len(sequences), "num_tokens": total,
            "greedy_agreement": same / total, "greedy_agreement_answer_tokens": same_answer / total_answer,
            "hidden_cosine": statistics.mean(cosines),
            "target_tokens_per_second": {k: total / v for k, v in seconds.items()}}


def step_seconds(target, target_dir: Path, repeats: int) -> dict:
    """Median seconds of one draft micro-batch step (2 sequences x 380 tokens, 4 heads, 8k vocab)."""
    generator = torch.Generator().manual_seed(0)
    batch_size, length = 2, 380
    input_ids = torch.randint(0, target.config.vocab_size, (batch_size, length), generator=generator)
    with torch.no_grad():
        hidden, greedy, _ = target_outputs(target, input_ids, torch.ones_like(input_ids))

    class Labels:  # build_draft maps the draft vocabulary from the labels' frequencies
        greedy = greedy.flatten().numpy()

    results = {}
    for fraction in (None, 0.25):
        for autocast in ("off", "bf16"):
            settings = TrainingSettings(
                target=str(target_dir), train_data="unused", output_dir="unused", num_heads=4,
                draft_overrides={"draft_vocab_size": 8192}, loss_positions_fraction=fraction,
                autocast=autocast)
            draft = trainer.build_draft(settings, target, Labels())
            loss_fn = trainer.build_loss(settings, draft)
            optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-3)
            enabled = trainer.autocast_enabled(autocast, torch.device("cpu"))
            batch = {"tokens": input_ids, "hidden": hidden.float(), "greedy": greedy,
                     "mask": torch.ones(batch_size, length, dtype=torch.bool),
                     "lengths": torch.tensor([length] * batch_size),
                     "position_seeds": position_seeds(0, 0, list(range(batch_size)))}
            times = []
            for _ in range(repeats + 1):  # the first step warms up
                start = time.perf_counter()
                with trainer.autocast_context(torch.device("cpu"), enabled):
                    loss, _ = loss_fn(batch)
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                times.append(time.perf_counter() - start)
            key = f"positions={fraction or 1.0} autocast={autocast}"
            results[key] = statistics.median(times[1:])
    return results


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=CACHE / "targets" / "smollm2")
    parser.add_argument("--answers", type=Path,
                        default=CACHE / "data" / "sharegpt" / "validation.smollm2-self.jsonl")
    parser.add_argument("--max-sequences", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target, tokenizer = trainer.load_target(str(args.target), torch.device("cpu"))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": cpu_name(),
              "cpu_bf16_native": trainer.native_bf16(torch.device("cpu")), "threads": args.threads,
              "labels": label_agreement(target, tokenizer, args.answers, args.max_sequences),
              "draft_step_seconds": step_seconds(target, args.target, args.repeats)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
