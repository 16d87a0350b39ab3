"""train(settings): self-distil a draft from a frozen target.

The run, in order: load the frozen target; cache its hidden states and greedy predictions
over the training and validation sequences (data.py); build the draft (settings.draft_kind:
Chimera, ChimeraConfig.for_target, or one of its peers, Medusa-1 heads or an EAGLE-1 draft,
peers.py) and its loss; AdamW with warm-up + cosine; a resumable checkpoint every
`save_every` steps; validation of per-head top-1 accuracy; metrics.json, log.jsonl and
loss_curve.png in the output folder, and the final draft in output_dir/draft (a peer in the
format vLLM's own `medusa` / `eagle` method loads).

Device-agnostic: the same call runs on a CPU, a GPU, or several GPUs under torchrun
(DistributedDataParallel; NCCL on GPUs, gloo on CPUs). Process 0 caches, logs and saves.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vllm_chimera.checkpoint import load_draft, target_embed_and_lm_head
from vllm_chimera.config import ChimeraConfig
from vllm_chimera.context_lookup import DEFAULT_MIN_MATCH, lookup_matches
from vllm_chimera.model import ChimeraDraftModel, confident_lengths
from vllm_chimera.prepare.cache import cache_dir
from vllm_chimera.training.checkpointing import (TrainState, has_checkpoint, load_checkpoint,
                                                 save_checkpoint, save_trained_draft)
from vllm_chimera.training.data import (CachedData, CachedDataList, build_cache, cache_key,
                                         load_sequences)
from vllm_chimera.training.loss import DraftLoss, position_seeds
from vllm_chimera.training.peers import build_peer, load_peer, peer_kind, peer_loss
from vllm_chimera.training.settings import TrainingSettings


# -- processes and devices ------------------------------------------------------------------
def setup_process(settings: TrainingSettings) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if settings.device == "auto":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) \
            if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta
        # Long timeout: the other processes wait while process 0 caches the target's outputs.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(hours=12))
    return rank, world, device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively: a CUDA GPU with bf16, or a CPU with
    AMX or AVX-512-BF16 (oneDNN then runs bf16 matmuls several times faster than fp32; on a
    CPU without them bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def autocast_enabled(setting: str, device: torch.device) -> bool:
    """settings.autocast -> whether the draft's forward runs under bf16 autocast.

    "auto": on a CUDA GPU with bf16 (the CPU path stays fp32 unless asked); "bf16": wherever
    bf16 is native (refused elsewhere: emulated bf16 would be slower than fp32); "off": fp32.
    """
    if setting == "off":
        return False
    if setting == "auto":
        return device.type == "cuda" and native_bf16(device)
    if not native_bf16(device):
        raise ValueError(f"autocast='bf16' on {device}, which has no native bf16 (no AMX or "
                         "AVX-512-BF16 on a CPU): it would be slower than fp32; use 'auto' or 'off'")
    return True


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast when `enabled` (autocast_enabled), else nothing: fp32. Master weights,
    optimizer state and the losses' softmax stay fp32 either way."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# -- target, data, draft --------------------------------------------------------------------
def load_target(target_dir: str, device: torch.device):
    """The frozen target (fp32, eval, no grads) and its tokenizer (None if it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).to(device).eval()
    target.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target_dir)
    except (OSError, ValueError, TypeError):  # a bare test model: token-id data only
        tokenizer = None
    return target, tokenizer


def cached_data(settings: TrainingSettings, target, tokenizer, paths: str, max_tokens, rank: int,
                world: int, precision: str = "fp32") -> CachedData | CachedDataList:
    """The target's cached outputs over `paths`: one file, or several separated by commas
    (one cache each, read as one dataset in order), computed in `precision`.

    A token limit takes the files in order until it is spent: e.g. files of 300k and 900k
    tokens with max_tokens=500k give all of the first and the first ~200k of the second
    (which the third, if any, then does not contribute to).
    """
    parts, remaining = [], max_tokens
    for path in paths.split(","):
        if remaining is not None and remaining <= 0:
            break
        parts.append(_cached_file(settings, target, tokenizer, path, remaining, rank, world,
                                  precision))
        if remaining is not None:
            remaining -= parts[-1].num_tokens
    return parts[0] if len(parts) == 1 else CachedDataList(parts)


def _cached_file(settings: TrainingSettings, target, tokenizer, path: str, max_tokens, rank: int,
                 world: int, precision: str) -> CachedData:
    """The target's cached outputs over `path` (process 0 builds them; the others wait)."""
    layer_ids = settings.draft_overrides.get("target_layer_ids") if settings.draft_kind == "chimera" else None
    key = cache_key(settings.target, path, settings.max_length, max_tokens, precision, layer_ids)
    folder = cache_dir(settings.cache_dir) / "hidden" / f"{Path(path).stem}-{key}"
    if rank == 0 and not (folder / "meta.json").is_file():
        sequences = load_sequences(path, tokenizer, settings.max_length, max_tokens)
        print(f"caching the target's outputs over {len(sequences)} sequences of {path} "
              f"in {folder}" + (f" (with layers {layer_ids})" if layer_ids else ""), flush=True)
        build_cache(target, sequences, folder, settings.cache_batch_tokens, settings.progress,
                    precision, layer_ids)
    barrier(world)
    return CachedData.open(folder)


def frequent_token_ids(train: CachedData, vocab_size: int, size: int | None) -> torch.Tensor | None:
    """A reduced draft vocabulary (Chimera's and Medusa's): the `size` target tokens the
    target itself predicts most often over `train` (ties: the lower id first), most
    frequent first, as a [size] int64 tensor of target ids; None when size is None."""
    if size is None:
        return None
    counts = np.bincount(np.asarray(train.greedy), minlength=vocab_size)
    return torch.from_numpy(np.argsort(-counts, kind="stable")[:size].copy())


def build_draft(settings: TrainingSettings, target, train: CachedData) -> torch.nn.Module:
    """A fresh draft of settings.draft_kind shaped like the target (seeded, so every process
    starts the same)."""
    torch.manual_seed(settings.seed)
    if settings.draft_kind != "chimera":
        frequent = frequent_token_ids(train, target.config.get_text_config().vocab_size,
                                      settings.draft_overrides.get("draft_vocab_size"))
        return build_peer(settings.draft_kind, target, settings.num_heads,
                          settings.draft_overrides, frequent)
    config = ChimeraConfig.for_target(
        target.config, num_decoding_heads=settings.num_heads,
        use_trigram_encoder=settings.use_trigram_encoder,
        use_context_encoder=settings.use_context_encoder, **settings.draft_overrides)
    if settings.init_from:
        return initial_draft(settings.init_from, config, target, train)
    draft = ChimeraDraftModel(config)
    frequent = frequent_token_ids(train, config.vocab_size, config.draft_vocab_size)
    return draft.bind_target(*target_embed_and_lm_head(target), frequent_token_ids=frequent)


def initial_draft(draft_dir: str, config: ChimeraConfig, target, train: CachedData) -> ChimeraDraftModel:
    """settings.init_from: the saved draft at `draft_dir` (fp32, bound to `target`, its
    reduced vocabulary kept), refused unless its design is `config`, the one the settings
    build (else its weights would not mean what the run's options say).

    Five changes of design are allowed; the first four start from exactly the saved draft's
    function:
    - parallel heads -> sequential heads (--sequential-heads): the new token_up weights at
      zero (the heads then learn to read the previous token from there on);
    - reading the target's layers (--target-layer-ids), where the saved draft read none: the
      new target_layer_fuse keeps ChimeraDraftModel's zero start (the saved draft lacks it);
    - wider hidden layers (--draft-intermediate-size for the encoder layer's MLP,
      --head-intermediate-size for the heads' R_i): `widen_into` (more capacity, the same
      function at the first step);
    - a deeper encoder (--encoder-layers more than the saved draft's): the new layers' output
      projections (o_proj, down_proj) at zero, so each starts as the identity on its
      residual stream;
    - a larger reduced vocabulary (--draft-vocab-size more than the saved draft's): see
      `grow_vocabulary` (the saved tokens keep their rows, so their logits are unchanged;
      the new tokens can outscore them from the first step).
    """
    draft = load_draft(draft_dir, target.config).float()
    saved, wanted = draft.config.to_dict(), config.to_dict()
    to_sequential = bool(wanted.get("sequential_heads") and not saved.get("sequential_heads"))
    ignored = {"sequential_heads"} if to_sequential else set()
    add_layers = bool(wanted.get("target_layer_ids") and not saved.get("target_layer_ids"))
    ignored |= {"target_layer_ids"} if add_layers else set()
    if saved.get("target_num_hidden_layers") is None:  # saved before it was recorded
        ignored.add("target_num_hidden_layers")
    widened = {k for k in ("intermediate_size", "head_intermediate_size")
               if wanted.get(k) is not None and saved.get(k) is not None and wanted[k] > saved[k]}
    ignored |= widened
    deepened = wanted.get("num_encoder_layers", 1) > saved.get("num_encoder_layers", 1)
    ignored |= {"num_encoder_layers"} if deepened else set()
    more_tokens = (saved.get("draft_vocab_size") is not None
                   and (wanted.get("draft_vocab_size") or 0) > saved["draft_vocab_size"])
    ignored |= {"draft_vocab_size"} if more_tokens else set()
    changed = draft.config.design_differences(config, ignored)
    if changed:
        raise ValueError(f"init_from {draft_dir} is not the draft these settings build: "
                         + ", ".join(f"{k} {saved.get(k)!r} (settings: {wanted.get(k)!r})"
                                     for k in changed)
                         + " (pass the options it was trained with, e.g. --draft-vocab-size)")
    if to_sequential or widened or add_layers or deepened or more_tokens:
        grown = ChimeraDraftModel(config)  # (seeded by build_draft: the new rows' init)
        widen_into(draft, grown)
        if more_tokens:
            grow_vocabulary(grown, draft.config.draft_vocab_size, target, train)
        if deepened:  # the new layers add nothing to their residual stream until trained
            for layer in grown.extra_layers[len(draft.extra_layers):]:
                torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
                torch.nn.init.zeros_(layer.mlp.down_proj.weight)
        if to_sequential:  # the same weights plus token_up = 0 (the only ones it lacks)
            for head in grown.heads:
                torch.nn.init.zeros_(head.token_up.weight)
        draft = grown
    return draft.bind_target(*target_embed_and_lm_head(target))


def grow_vocabulary(draft: ChimeraDraftModel, num_saved: int, target, train: CachedData) -> None:
    """Fill the rows past `num_saved` of a grown draft's reduced vocabulary (`widen_into` has
    copied the saved draft's rows and ids into the first `num_saved`): the target tokens
    the target predicts most often over `train` that the saved vocabulary lacks, most
    frequent first, each with the target's own LM-head row (as a fresh draft's rows start).

    e.g. saved ids [7, 3] (num_saved 2), train's most frequent [3, 9, 7, 4], size 4:
        draft_to_target_ids [7, 3, 9, 4]; draft_lm_head rows 2, 3 = the target's rows 9, 4.
    """
    saved_ids = draft.draft_to_target_ids[:num_saved]  # [num_saved]
    size = draft.config.draft_vocab_size
    ranked = frequent_token_ids(train, draft.config.vocab_size, draft.config.vocab_size)  # [V]
    new_ids = ranked[~torch.isin(ranked, saved_ids)][:size - num_saved]  # [size - num_saved]
    _, lm_head_weight = target_embed_and_lm_head(target)
    with torch.no_grad():
        draft.draft_to_target_ids[num_saved:] = new_ids
        draft.draft_lm_head.weight[num_saved:] = lm_head_weight[new_ids].to(draft.draft_lm_head.weight)


# Weights that read a hidden layer a wider draft grows (their input dimension): each
# encoder layer's MLP down_proj (`layer.` and `extra_layers.N.`) and each head's down. Their
# new columns start at zero, so the new hidden units add nothing until trained; every other
# grown weight (gate/up rows: the new units' inputs) keeps the fresh draft's initialisation.
_READS_HIDDEN_LAYER = (".mlp.down_proj.weight", ".down.weight")


def widen_into(saved: torch.nn.Module, grown: torch.nn.Module) -> None:
    """Copy `saved`'s weights into `grown`, a draft of the same design whose hidden layers
    may be wider (and which may have more parts: token_up, target_layer_fuse, extra encoder
    layers, set up by `initial_draft`), so that `grown` computes exactly what `saved` does.

    e.g. a head 576 -> 1152 wide: up [576, 1152] -> [1152, 1152] keeps rows 0..575 and
    its 576 freshly initialised new rows; down [576, 576] -> [576, 1152] keeps columns
    0..575 and zeros columns 576..1151, so down(silu(up(x))) is unchanged.
    Weights `grown` lacks or has smaller are an error; weights `saved` lacks (token_up of a
    parallel draft) keep `grown`'s own values.
    """
    new_state = grown.state_dict()
    for name, value in saved.state_dict().items():
        target = new_state.get(name)
        if target is None or any(a < b for a, b in zip(target.shape, value.shape)):
            raise ValueError(f"widen_into: {name} {tuple(value.shape)} does not fit in "
                             f"{None if target is None else tuple(target.shape)}")
        if target.shape != value.shape and name.endswith(_READS_HIDDEN_LAYER):
            target.zero_()
        target[tuple(slice(0, n) for n in value.shape)] = value
    grown.load_state_dict(new_state)


def build_loss(settings: TrainingSettings, draft: torch.nn.Module) -> torch.nn.Module:
    """The draft's training loss: forward(batch) -> (loss, stats); summarize(stats) -> figures."""
    if settings.draft_kind == "chimera":
        return DraftLoss(draft, settings.weights(), settings.loss_on,
                         settings.loss_positions_fraction, settings.kl_weight,
                         settings.regression_weight, settings.skip_lookup_matches)
    return peer_loss(draft, settings.weights(), settings.loss_on, settings.draft_overrides,
                     settings.loss_positions_fraction, settings.kl_weight,
                     settings.regression_weight, settings.skip_lookup_matches)


# -- schedule and data order ----------------------------------------------------------------
def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def step_indices(step: int, num_sequences: int, settings: TrainingSettings, rank: int,
                 world: int) -> list[list[int]]:
    """This process's micro-batches (sequence indices) for `step`.

    A pure function of the step: each epoch is a fixed-seed permutation, so a resumed run
    sees exactly the batches an uninterrupted one would.
    """
    steps_per_epoch = num_sequences // settings.batch_size
    epoch, within = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
    order = torch.randperm(num_sequences, generator=generator)
    batch = order[within * settings.batch_size:(within + 1) * settings.batch_size].tolist()
    mine = batch[rank::world]
    m = settings.micro_batch_size
    return [mine[i:i + m] for i in range(0, len(mine), m)]


# -- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(loss_module: torch.nn.Module, data: CachedData, settings: TrainingSettings,
             device: torch.device) -> dict:
    """Per-head top-1 accuracy (and loss) on held-out data, plus a chain estimate.

    est_accept_length = 1 + E[number of leading heads that are right], over positions where
    all K heads have a label: the tokens per target step a chain of K would get if the
    teacher-forced sequence were the target's own greedy continuation. (For EAGLE the
    "heads" are its K draft steps, run in eval mode as vLLM runs them.)
    head_conditional_accuracy[i] = P(head i right | heads 0..i-1 right), on the same
    positions: what a chain accepts at depth i, and the fair comparison of sequential heads
    (teacher-forced: after a miss their head_accuracy reads the right previous token, which
    at inference they would not have) with parallel ones.
    vocabulary_coverage (a reduced draft vocabulary): per head, the share of its labels the
    draft vocabulary holds, the ceiling of its head_accuracy.
    lookup_misses: the same figures (head_accuracy, est_accept_length, vocabulary_coverage)
    on the positions where the context lookup finds no match (min_match:
    settings.skip_lookup_matches, else the lookup's default), the only ones where the heads
    draft inside vLLM with the lookup on; share: their part of the positions head 0 is
    scored at.
    confidence_cut (Chimera drafts): for each min_confidence in CONFIDENCE_GRID, the drafted
    and accepted tokens per step of chains cut where the heads' confidence falls below it
    (vllm_chimera.model.confident_lengths, as vLLM's min_confidence cuts them).
    """
    was_training = loss_module.training
    loss_module.eval()
    totals = 0
    run_sum, run_count = 0.0, 0
    reached, right = 0, 0  # [K] positions where heads < i were all right, and i right too
    cut_drafted = cut_accepted = 0  # [len(CONFIDENCE_GRID)] sums over the positions
    min_match = settings.skip_lookup_matches or DEFAULT_MIN_MATCH
    miss_hits = miss_counts = 0  # [K] at the positions without a lookup match
    miss_run_sum, miss_run_count, num_scored = 0.0, 0, 0
    covered = miss_covered = None  # [K] labels in a reduced draft vocabulary (all, misses)
    m = settings.micro_batch_size
    for start in range(0, len(data), m):
        batch = data.batch(list(range(start, min(start + m, len(data)))), device)
        with autocast_context(device, autocast_enabled(settings.autocast, device)):
            _, stats = loss_module(batch)
        totals += stats.double().cpu()
        hits, valid = loss_module.last_hits, loss_module.last_valid  # [K, P]
        full = valid.all(0)  # positions where every head has a label
        chain = hits[:, full].int().cumprod(0)  # [K, P_full]: heads 0..i all right
        run_sum += float(chain.sum())
        run_count += int(full.sum())
        misses = ~lookup_matches(batch["tokens"], batch["lengths"],
                                 min_match)[loss_module.last_selected]  # [P]
        miss_hits = miss_hits + hits[:, misses].sum(1).double().cpu()
        miss_counts = miss_counts + valid[:, misses].sum(1).double().cpu()
        miss_run_sum += float(hits[:, full & misses].int().cumprod(0).sum())
        miss_run_count += int((full & misses).sum())
        num_scored += int(valid[0].sum())
        in_vocabulary = getattr(loss_module, "last_in_vocabulary", None)  # [K, P] (Chimera's loss)
        if in_vocabulary is not None:
            covered = (0 if covered is None else covered) + in_vocabulary.sum(1).double().cpu()
            miss_covered = ((0 if miss_covered is None else miss_covered)
                            + in_vocabulary[:, misses].sum(1).double().cpu())
        right = right + chain.sum(1).double()
        reached = reached + torch.cat([torch.full_like(chain[:1], 1), chain[:-1]]).sum(1).double()
        probs = getattr(loss_module, "last_top1_probs", None)  # [K, P] (Chimera's loss only)
        if probs is not None:
            drafted, accepted = confidence_cut(chain, probs[:, full])
            cut_drafted, cut_accepted = cut_drafted + drafted, cut_accepted + accepted
    loss_module.train(was_training)
    conditional = (right / reached.clamp(min=1)).tolist() if run_count else []
    metrics = {**loss_module.summarize(totals), "est_accept_length": 1 + run_sum / max(run_count, 1),
               "head_conditional_accuracy": conditional}
    if num_scored:
        metrics["lookup_misses"] = {
            "min_match": min_match, "share": float(miss_counts[0]) / num_scored,
            "head_accuracy": (miss_hits / miss_counts.clamp(min=1)).tolist(),
            "est_accept_length": 1 + miss_run_sum / max(miss_run_count, 1)}
    if covered is not None and num_scored:
        metrics["vocabulary_coverage"] = (covered / totals[:, 2].clamp(min=1)).tolist()
        metrics["lookup_misses"]["vocabulary_coverage"] = (
            miss_covered / miss_counts.clamp(min=1)).tolist()
    if run_count and torch.is_tensor(cut_drafted):
        metrics["confidence_cut"] = [
            {"min_confidence": c, "drafted": float(d) / run_count, "accepted": float(a) / run_count}
            for c, d, a in zip(CONFIDENCE_GRID, cut_drafted, cut_accepted)]
    return metrics


# min_confidence values validation reports a chain's drafted and accepted tokens at.
CONFIDENCE_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def confidence_cut(chain: torch.Tensor, top1_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed drafted and accepted tokens of chains cut at each CONFIDENCE_GRID value.

    chain [K, P] 1 where heads 0..i are all right, top1_probs [K, P] -> ([G], [G]): a chain
    cut to n heads drafts n and is accepted up to min(n, its leading right heads).
    e.g. one position, chain [1, 1, 0, 0], probabilities [0.9, 0.5, 0.8, 0.9]: products
    0.9, 0.45, 0.36, 0.324; at 0.4 cut to 2 heads -> 2 drafted, 2 accepted; at 0.3 not cut
    -> 4 drafted, 2 accepted.
    """
    run = chain.sum(0)  # [P] leading right heads
    drafted, accepted = [], []
    for min_confidence in CONFIDENCE_GRID:
        lengths = confident_lengths(top1_probs.t(), min_confidence)  # [P]
        drafted.append(lengths.sum())
        accepted.append(torch.minimum(lengths, run).sum())
    return torch.stack(drafted).double().cpu(), torch.stack(accepted).double().cpu()


# -- one optimizer step ---------------------------------------------------------------------
def train_step(model, loss_module: torch.nn.Module, micro_batches, data: CachedData, optimizer,
               scheduler, settings: TrainingSettings, device: torch.device,
               step: int = 0) -> torch.Tensor:
    """Forward/backward over this process's micro-batches, then one optimizer step (`step`,
    counted from 0, seeds the loss's subset of positions with settings.loss_positions_fraction).

    Returns the summed stats of this process (per head [CE sum, correct, count, KL sum,
    regression sum]: [K, 5] for heads; the loss module's own rows otherwise).
    """
    stats_total = 0
    for i, indices in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Under DDP, gradients are all-reduced only on the last micro-batch.
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) \
            else model.no_sync()
        batch = data.batch(indices, device)
        if settings.loss_positions_fraction is not None:
            # Seeded by (seed, step, sequence): a resumed run draws the same subsets.
            batch["position_seeds"] = position_seeds(settings.seed, step, indices)  # [B]
        with sync:
            with autocast_context(device, autocast_enabled(settings.autocast, device)):
                loss, stats = model(batch)
            (loss / len(micro_batches)).backward()
        stats_total += stats.float().cpu()
    if settings.grad_clip:
        torch.nn.utils.clip_grad_norm_(loss_module.parameters(), settings.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats_total


def reduce_stats(stats: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Sum stats (e.g. [K, 5]) over processes (on `device`: NCCL reduces only GPU tensors)."""
    if world > 1:
        stats = stats.to(device)
        dist.all_reduce(stats)
    return stats.cpu()


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop then checkpoints and returns instead of dying mid-step."""

    def __init__(self):
        self.stop = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their owner
                pass
        return self

    def _handle(self, signum, frame):
        print(f"\nsignal {signum}: stopping after this step (checkpoint saved)", flush=True)
        self.stop = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- the run --------------------------------------------------------------------------------
def load_target_and_data(settings: TrainingSettings, device: torch.device, rank: int = 0,
                         world: int = 1):
    """(target, tokenizer, train CachedData, validation CachedData or None): the target's
    outputs are computed and cached on first use, read back afterwards."""
    target, tokenizer = load_target(settings.target, device)
    # Training data may be cached in bf16 (settings.cache_precision); held-out data is
    # always fp32, so that validation scores against the labels vLLM's fp32 target gives.
    train_data = cached_data(settings, target, tokenizer, settings.train_data,
                             settings.train_tokens, rank, world, settings.cache_precision)
    val_data = cached_data(settings, target, tokenizer, settings.val_data, settings.val_tokens,
                           rank, world) if settings.val_data else None
    return target, tokenizer, train_data, val_data


def cache_only(settings: TrainingSettings) -> dict:
    """Cache the target's outputs over the training and validation data, and stop.

    Lets one process with every core fill the cache before several runs share it.
    """
    _, _, device = setup_process(settings)
    started = time.time()
    _, _, train_data, val_data = load_target_and_data(settings, device)
    summary = {"train_sequences": len(train_data), "train_tokens": train_data.num_tokens,
               "val_tokens": val_data.num_tokens if val_data is not None else 0,
               "seconds": round(time.time() - started, 1)}
    print(f"cached: {summary}", flush=True)
    return summary


def train(settings: TrainingSettings) -> dict:
    """Train a draft as `settings` says; returns the metrics (also in output_dir/metrics.json).

    Re-running with the same output_dir resumes from its last checkpoint (settings.resume).
    """
    rank, world, device = setup_process(settings)
    if settings.batch_size % world:
        raise ValueError(f"batch_size {settings.batch_size} must be a multiple of the "
                         f"number of processes ({world})")
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    target, tokenizer, train_data, val_data = load_target_and_data(settings, device, rank, world)
    cache_seconds = time.time() - started
    if len(train_data) < settings.batch_size:
        raise ValueError(f"{len(train_data)} training sequences, fewer than one batch "
                         f"({settings.batch_size})")
    draft = build_draft(settings, target, train_data).to(device)
    loss_module = build_loss(settings, draft).to(device)
    model = DistributedDataParallel(loss_module) if world > 1 else loss_module
    optimizer = torch.optim.AdamW(draft.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    steps_per_epoch = len(train_data) // settings.batch_size
    total_steps = max(1, round(settings.epochs * steps_per_epoch))
    warmup = max(1, round(settings.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, settings.min_lr_ratio))
    saved_settings = asdict(settings)
    ckpt = out / "checkpoint"
    state = TrainState()
    if settings.resume and has_checkpoint(ckpt):
        state = load_checkpoint(ckpt, draft, optimizer, scheduler, saved_settings)
        if rank == 0:
            print(f"resumed from {ckpt} at step {state.step}/{total_steps}", flush=True)
    stop_at = min(total_steps, settings.stop_at_step or total_steps)
    state = _loop(model, loss_module, draft, train_data, val_data, optimizer, scheduler, state,
                  settings, rank, world, device, total_steps, stop_at, ckpt, saved_settings)
    finished = state.step >= total_steps
    metrics = None
    if rank == 0:
        metrics = _finish(settings, draft, loss_module, train_data, val_data, state, device,
                          total_steps, finished, cache_seconds, world)
    barrier(world)
    return metrics


def _loop(model, loss_module, draft, train_data, val_data, optimizer, scheduler, state,
          settings, rank, world, device, total_steps, stop_at, ckpt, saved_settings) -> TrainState:
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
               disable=rank != 0 or not settings.progress, dynamic_ncols=True)
    loss_module.train()
    with StopFlag() as flag:
        while state.step < stop_at:
            tick, cpu_tick = time.time(), time.process_time()
            micro = step_indices(state.step, len(train_data), settings, rank, world)
            stats = reduce_stats(train_step(model, loss_module, micro, train_data, optimizer,
                                            scheduler, settings, device, state.step), world, device)
            state.step += 1
            state.train_seconds += time.time() - tick
            state.train_cpu_seconds += time.process_time() - cpu_tick
            summary = loss_module.summarize(stats)
            summary.pop("head_tokens")
            record = {"step": state.step, "lr": scheduler.get_last_lr()[0], **summary,
                      **_clock(state)}
            state.history.append(record)
            bar.set_postfix_str(f"loss {record['loss']:.3f} acc "
                                + " ".join(f"{a:.2f}" for a in record["head_accuracy"]))
            bar.update(1)
            if settings.eval_every and state.step % settings.eval_every == 0 and val_data is not None:
                if rank == 0:
                    state.history.append({"step": state.step, **_clock(state), "validation":
                                          evaluate(loss_module, val_data, settings, device)})
                barrier(world)
            # Every process must agree to stop, or the others would wait in all-reduce forever.
            stop = _any(flag.stop, world, device)
            if state.step % settings.save_every == 0 or state.step == stop_at or stop:
                if rank == 0:
                    save_checkpoint(ckpt, draft, optimizer, scheduler, state, saved_settings)
                    _write_log(Path(settings.output_dir), state.history)
                barrier(world)
            if stop:
                break
    bar.close()
    return state


def _clock(state: TrainState) -> dict:
    """The training time so far, for a log record: wall seconds and this process's CPU
    seconds (all its threads; validation and checkpoints excluded), so that learning curves
    can be drawn per CPU-second."""
    return {"seconds": round(state.train_seconds, 2),
            "cpu_seconds": round(state.train_cpu_seconds, 2)}


def _any(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _write_log(out: Path, history: list) -> None:
    with (out / "log.jsonl").open("w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")


def _finish(settings, draft, loss_module, train_data, val_data, state, device, total_steps,
            finished, cache_seconds, world) -> dict:
    """Validation, the final draft, metrics.json and the loss plot (process 0)."""
    from vllm_chimera.training.plot import plot_history

    out = Path(settings.output_dir)
    validation = evaluate(loss_module, val_data, settings, device) if val_data is not None else None
    if validation is not None and not any(r.get("step") == state.step and "validation" in r
                                          for r in state.history):
        state.history.append({"step": state.step, **_clock(state),
                              "validation": validation})  # plotted too
    if finished:
        save_trained_draft(draft, out / "draft")
    recent = [r for r in state.history if "loss" in r][-20:]
    num_rows = len(recent[-1]["head_accuracy"]) if recent else 0  # EAGLE trains step 1 only
    metrics = {
        "finished": finished, "steps": state.step, "total_steps": total_steps,
        "train_sequences": len(train_data), "train_tokens": train_data.num_tokens,
        "epochs": settings.epochs,
        "val_sequences": len(val_data) if val_data is not None else 0,
        "val_tokens": val_data.num_tokens if val_data is not None else 0,
        "train_loss_last20": sum(r["loss"] for r in recent) / max(len(recent), 1),
        "train_head_accuracy_last20": [sum(r["head_accuracy"][i] for r in recent) / max(len(recent), 1)
                                       for i in range(num_rows)],
        "validation": validation,
        "draft_parameters": draft.num_parameters(),
        "train_seconds": round(state.train_seconds, 1),
        "train_cpu_seconds": round(state.train_cpu_seconds, 1),  # all of its threads
        "cache_seconds_this_session": round(cache_seconds, 1),
        "machine": {"device": str(device), "processes": world,
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count()},
        "settings": asdict(settings),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_log(out, state.history)
    plot_history(state.history, out / "loss_curve.png")
    if validation is not None:
        print("validation top-1 accuracy per head: "
              + " ".join(f"{a:.3f}" for a in validation["head_accuracy"])
              + " | given the heads before right: "
              + " ".join(f"{a:.3f}" for a in validation["head_conditional_accuracy"])
              + f" | est. acceptance length {validation['est_accept_length']:.2f}", flush=True)
        if "lookup_misses" in validation:
            misses = validation["lookup_misses"]
            print(f"where the lookup (min_match {misses['min_match']}) has no match "
                  f"({misses['share']:.0%} of the positions): "
                  + " ".join(f"{a:.3f}" for a in misses["head_accuracy"])
                  + f" | est. acceptance length {misses['est_accept_length']:.2f}"
                  + (f" | head 0's labels in the draft vocabulary {misses['vocabulary_coverage'][0]:.3f}"
                     if "vocabulary_coverage" in misses else ""), flush=True)
    print(f"wrote {out / 'metrics.json'}" + (f" and the draft {out / 'draft'}" if finished else
          f" (stopped at step {state.step}/{total_steps}; run again to resume)"), flush=True)
    return metrics


def evaluate_draft(settings: TrainingSettings, draft_dir: str) -> dict:
    """Per-head validation accuracy of a saved draft on settings.val_data (one process).

    Uses the same cached target outputs as training, so two drafts can be compared on the
    same held-out data (e.g. one trained on dataset answers, one on the target's own, or
    Chimera against its Medusa and EAGLE peers: an exported peer is recognised by itself).
    """
    loss_module, val_data, device = validation_setup(settings, draft_dir)
    metrics = {"draft": str(draft_dir), "draft_kind": settings.draft_kind, "val_data": settings.val_data,
               "val_tokens": val_data.num_tokens,
               "validation": evaluate(loss_module, val_data, settings, device)}
    print(json.dumps(metrics, indent=2), flush=True)
    return metrics


def evaluate_to_file(settings: TrainingSettings, draft_dir: str) -> Path:
    """evaluate_draft, written to OUTPUT_DIR/evaluation.json; returns that file."""
    metrics = evaluate_draft(settings, draft_dir)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out / "evaluation.json"


def validation_setup(settings: TrainingSettings, draft_dir: str):
    """A saved draft (Chimera, or an exported peer, recognised by itself) in its loss module,
    and the cached target outputs of settings.val_data: (loss_module, val_data, device).
    Sets settings.draft_kind, num_heads and head_weights (equal) to the draft's."""
    from vllm_chimera.checkpoint import load_draft_for_target

    if settings.val_data is None:
        raise ValueError("evaluation needs validation data")
    _, _, device = setup_process(settings)
    target, tokenizer = load_target(settings.target, device)
    kind = peer_kind(draft_dir) or "chimera"
    if kind == "chimera":
        draft = load_draft_for_target(draft_dir, target)
        settings.num_heads = draft.config.num_decoding_heads
        if draft.config.target_layer_ids:  # its cache must hold the layers it reads
            settings.draft_overrides["target_layer_ids"] = draft.config.target_layer_ids
    else:
        draft = load_peer(draft_dir, target)
        settings.num_heads = draft.num_heads if kind == "medusa" else draft.num_steps
    settings.draft_kind, settings.head_weights = kind, [1.0] * settings.num_heads
    val_data = cached_data(settings, target, tokenizer, settings.val_data, settings.val_tokens, 0, 1)
    return build_loss(settings, draft).to(device), val_data, device
