"""Training data: conversations -> token sequences -> the frozen target's cached outputs.

The target's forward pass is the expensive part on a CPU (about 300 tokens/s for SmolLM2),
so it runs once per sequence and its outputs are cached on disk; epochs then read them back.

A cache is a folder of numpy arrays over all sequences' tokens, concatenated:
    tokens.npy  [N] int32     the token ids x_t
    mask.npy    [N] uint8     1 where a loss may be taken (see `tokenize_conversation`)
    greedy.npy  [N] int32     the target's argmax prediction at t (its guess for x_{t+1})
    hidden.npy  [N, d] fp16   h_t, the target's final-normed hidden state
    offsets.npy [S + 1] int64 where each of the S sequences starts
    layers.npy  [N, n * d] fp16  only for a draft with n target_layer_ids: the target's
                              residual stream at those layers (target_layers.py)
and meta.json. progress.json counts the sequences done, so an interrupted caching resumes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vllm_chimera.prepare.cache import read_jsonl
from vllm_chimera.target_layers import capture_layer_inputs

CACHE_VERSION = 1


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Render `messages` with the chat template; returns (ids, mask), both cut at max_length.

    mask is 1 on the tokens of assistant turns (their text and end-of-turn marker): the
    positions where a draft proposes at inference time. Each turn's span is found by
    rendering the conversation up to it, which is exact because turns end on special tokens.
    """
    def length(prefix, generation_prompt):
        text = tokenizer.apply_chat_template(prefix, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    spans, end = [], 0
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start = length(messages[:k], True)
            end = length(messages[:k + 1], False)
            spans.append((start, end))
        if end >= max_length:  # the rest would be cut anyway
            messages = messages[:k + 1]
            break
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    mask = [0] * len(ids)
    for start, stop in spans:
        for t in range(start, min(stop, len(ids))):
            mask[t] = 1
    return ids, mask


def load_sequences(path: str | os.PathLike, tokenizer, max_length: int,
                   max_tokens: int | None) -> list[tuple[list[int], list[int]]]:
    """Rows of a JSONL file as (ids, mask) pairs, in file order, until max_tokens.

    A row is either {"input_ids": [...], "loss_mask": [...] (optional, default all 1)} or a
    conversation {"messages": [...]} rendered with the target's chat template.
    """
    sequences, total = [], 0
    for row in read_jsonl(path):
        if "input_ids" in row:
            ids = list(row["input_ids"])[:max_length]
            mask = list(row.get("loss_mask") or [1] * len(ids))[:max_length]
        elif "messages" in row:
            if tokenizer is None:
                raise ValueError(f"{path} holds conversations but the target has no tokenizer")
            ids, mask = tokenize_conversation(tokenizer, row["messages"], max_length)
        else:
            raise ValueError(f"{path}: a row needs 'input_ids' or 'messages', got {sorted(row)}")
        if len(ids) < 4 or not any(mask):  # nothing a head could learn from
            continue
        sequences.append((ids, mask))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not sequences:
        raise ValueError(f"{path} gave no usable sequences")
    return sequences


def cache_key(target_dir: str | os.PathLike, data_path: str | os.PathLike, max_length: int,
              max_tokens: int | None, precision: str = "fp32", layer_ids=None) -> str:
    """A short hash of everything the cached arrays depend on (fp32 caches, and caches
    without target layers, keep the keys they had before `precision` and `layer_ids`)."""
    target_dir, data_path = Path(target_dir).resolve(), Path(data_path).resolve()
    parts = (CACHE_VERSION, target_dir, (target_dir / "config.json").read_text(),
             (target_dir / "model.safetensors").stat().st_size
             if (target_dir / "model.safetensors").exists() else 0,
             data_path, data_path.stat().st_size, data_path.stat().st_mtime_ns,
             max_length, max_tokens)
    parts += () if precision == "fp32" else (precision,)
    parts += () if not layer_ids else (f"layers{list(layer_ids)}",)
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class CachedData:
    """The target's cached outputs over a set of sequences (see the module docstring)."""
    folder: Path
    tokens: np.ndarray  # [N] int32
    mask: np.ndarray  # [N] uint8
    greedy: np.ndarray  # [N] int32
    hidden: np.ndarray  # [N, d] float16 (a read-only memmap)
    offsets: np.ndarray  # [S + 1] int64
    layers: np.ndarray | None = None  # [N, n * d] float16, with target_layer_ids only

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "CachedData":
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        if not meta.get("complete"):
            raise ValueError(f"hidden-state cache {folder} is incomplete")
        names = ("tokens", "mask", "greedy", "hidden", "offsets") + (
            ("layers",) if meta.get("target_layer_ids") else ())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}
        return cls(folder, **arrays)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> tuple[np.ndarray, ...]:
        """Sequence i: (tokens, greedy, mask, hidden, layers or None) arrays of its length."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return (self.tokens[a:b], self.greedy[a:b], self.mask[a:b], self.hidden[a:b],
                None if self.layers is None else self.layers[a:b])

    def batch(self, indices, device: torch.device) -> dict[str, torch.Tensor]:
        return pad_rows([self.row(i) for i in indices], device)


@dataclass
class CachedDataList:
    """Several caches read as one dataset, in order: one cache per training file, so that
    adding a file (more generated answers) does not recompute the others.
    e.g. parts of 3 and 5 sequences: sequence 4 is sequence 1 of the second part."""
    parts: list[CachedData]

    def __post_init__(self):
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])  # [num_parts + 1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(part.num_tokens for part in self.parts)

    @property
    def greedy(self) -> np.ndarray:
        return np.concatenate([np.asarray(part.greedy) for part in self.parts])

    def row(self, i: int) -> tuple[np.ndarray, ...]:
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part].row(i - int(self.starts[part]))

    def batch(self, indices, device: torch.device) -> dict[str, torch.Tensor]:
        return pad_rows([self.row(i) for i in indices], device)


def pad_rows(rows, device: torch.device) -> dict[str, torch.Tensor]:
    """Sequences (CachedData.row), right-padded to the longest, as tensors on `device`.

    Returns tokens [B, L] long, hidden [B, L, d] float32, greedy [B, L] long,
    mask [B, L] bool (False on padding), lengths [B] long, and where the cache has them
    layers [B, L, n * d] float32 (the target's layer inputs, target_layer_ids).
    """
    lengths = [len(row[0]) for row in rows]
    B, L, d = len(rows), max(lengths), rows[0][3].shape[1]
    tokens = np.zeros((B, L), np.int64)
    greedy = np.zeros((B, L), np.int64)
    mask = np.zeros((B, L), bool)
    hidden = np.zeros((B, L, d), np.float32)
    layers = None if rows[0][4] is None else np.zeros((B, L, rows[0][4].shape[1]), np.float32)
    for i, ((row_tokens, row_greedy, row_mask, row_hidden, row_layers), n) in enumerate(
            zip(rows, lengths)):
        tokens[i, :n] = row_tokens
        greedy[i, :n] = row_greedy
        mask[i, :n] = row_mask.astype(bool)
        hidden[i, :n] = row_hidden
        if layers is not None:
            layers[i, :n] = row_layers
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    batch = {"tokens": as_tensor(tokens), "hidden": as_tensor(hidden),
             "greedy": as_tensor(greedy), "mask": as_tensor(mask),
             "lengths": torch.tensor(lengths, device=device)}
    if layers is not None:
        batch["layers"] = as_tensor(layers)
    return batch


@torch.no_grad()
def target_outputs(target, ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int = 1024,
                   layer_ids=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The frozen target over right-padded ids [B, L]: (h [B, L, d], greedy [B, L], layers).

    h is the final-normed hidden state (what the LM head reads); greedy its argmax token,
    computed in chunks of positions so the [*, V] logits stay small; layers the inputs of
    the decoder layers `layer_ids` [B, L, n * d] (None without layer_ids).
    """
    with (capture_layer_inputs(target, layer_ids) if layer_ids
          else contextlib.nullcontext([None])) as captured:
        hidden = target.base_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    lm_head = target.get_output_embeddings().weight  # [V, d]
    flat = hidden.reshape(-1, hidden.shape[-1])  # [B * L, d]
    greedy = torch.cat([(flat[i:i + chunk] @ lm_head.t()).argmax(-1)
                        for i in range(0, flat.shape[0], chunk)])
    return hidden, greedy.view(ids.shape), captured[-1]


def build_cache(target, sequences: list[tuple[list[int], list[int]]], folder: Path,
                batch_tokens: int = 4096, progress: bool = True,
                precision: str = "fp32", layer_ids=None) -> CachedData:
    """Run the target over `sequences` once and store its outputs in `folder` (resumable).

    precision "bf16" runs the target under bf16 autocast: about 2-3x faster on a CPU with
    AMX; on SmolLM2's held-out answers its greedy labels agree with fp32's on 99.4% of the
    answer tokens (results/training/recipe-pilots/bf16/README.md). layer_ids: also store the
    inputs of those decoder layers (layers.npy, for a draft with target_layer_ids).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"cache precision must be 'fp32' or 'bf16', got {precision!r}")
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    meta_path, progress_path = folder / "meta.json", folder / "progress.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("complete"):
        return CachedData.open(folder)
    lengths = np.array([len(ids) for ids, _ in sequences], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    N, d = int(offsets[-1]), target.config.get_text_config().hidden_size
    done = json.loads(progress_path.read_text())["done"] if progress_path.is_file() else 0
    mode = "r+" if done else "w+"  # continue an interrupted caching in place
    shapes = [("tokens", np.int32, (N,)), ("mask", np.uint8, (N,)), ("greedy", np.int32, (N,)),
              ("hidden", np.float16, (N, d))]
    if layer_ids:
        shapes.append(("layers", np.float16, (N, len(layer_ids) * d)))
    arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode=mode, dtype=dtype, shape=shape)
              for name, dtype, shape in shapes}
    np.save(folder / "offsets.npy", offsets)
    device = next(target.parameters()).device
    bar = tqdm(total=N, initial=int(offsets[done]), unit="tok", desc="caching target outputs",
               disable=not progress, dynamic_ncols=True)
    while done < len(sequences):
        # As many whole sequences as fit in batch_tokens (at least one).
        stop = done + 1
        while stop < len(sequences) and (stop + 1 - done) * lengths[done:stop + 1].max() <= batch_tokens:
            stop += 1
        batch = sequences[done:stop]
        L = int(lengths[done:stop].max())
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        attention = torch.zeros(len(batch), L, dtype=torch.long)
        for row, (seq, _) in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
        with (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
              else contextlib.nullcontext()):
            hidden, greedy, layers = target_outputs(target, ids.to(device), attention.to(device),
                                                    layer_ids=layer_ids)
        for row, (seq, mask) in enumerate(batch):
            a, n = int(offsets[done + row]), len(seq)
            arrays["tokens"][a:a + n] = seq
            arrays["mask"][a:a + n] = mask
            arrays["greedy"][a:a + n] = greedy[row, :n].cpu().numpy()
            arrays["hidden"][a:a + n] = hidden[row, :n].to(torch.float16).cpu().numpy()
            if layers is not None:
                arrays["layers"][a:a + n] = layers[row, :n].to(torch.float16).cpu().numpy()
        for array in arrays.values():
            array.flush()
        done = stop
        progress_path.write_text(json.dumps({"done": done}))
        bar.update(int(offsets[done] - offsets[done - len(batch)]))
    bar.close()
    meta = {"complete": True, "version": CACHE_VERSION, "precision": precision,
            "target_layer_ids": list(layer_ids) if layer_ids else None,
            "num_sequences": len(sequences),
            "num_tokens": N, "hidden_size": d, "loss_tokens": int(sum(sum(m) for _, m in sequences))}
    meta_path.write_text(json.dumps(meta, indent=2))
    return CachedData.open(folder)
