"""TrainingSettings: every knob of a training run, in one dataclass (the CLI fills it)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class TrainingSettings:
    """One training run of a draft (Chimera, or a Medusa / EAGLE peer) against a frozen target.

    Paths:
        target: the target's Hugging Face folder (`chimera-prepare target ...` makes one).
        train_data, val_data: JSONL conversations ({"messages": [...]}, rendered with the
            target's chat template) or token rows ({"input_ids": [...], "loss_mask": [...]}).
        output_dir: checkpoints, the final draft, logs, metrics.json and loss_curve.png.
        cache_dir: where the target's hidden states are cached (default: the prepare cache).
    """
    target: str
    train_data: str
    output_dir: str
    val_data: str | None = None
    cache_dir: str | None = None
    # -- the draft ------------------------------------------------------------------------
    # "chimera", or a peer for the benchmark (peers.py): "medusa" (Medusa-1 heads) or "eagle"
    # (EAGLE-1), trained on the same data and exported for vLLM's own method of that name.
    draft_kind: str = "chimera"
    num_heads: int = 4  # K: Chimera's / Medusa's heads; EAGLE's validated draft steps
    use_trigram_encoder: bool = True
    use_context_encoder: bool = True
    # Extra ChimeraConfig fields; for a peer, its options (peers.PEER_OPTIONS).
    draft_overrides: dict = field(default_factory=dict)
    # Start from the weights of a saved Chimera draft (a finished run's draft/ folder, or the
    # shipped one) instead of random ones: training continued on new data in a later
    # session, as only the repository outlives a machine here. Fresh optimizer and schedule
    # (a warm restart); the draft's config must be the one these settings would build.
    init_from: str | None = None
    # -- data -----------------------------------------------------------------------------
    max_length: int = 512  # tokens per sequence (longer conversations are cut)
    # Take sequences until this many tokens (None: all); over several files, in file order.
    train_tokens: int | None = None
    val_tokens: int | None = 20_000
    loss_on: str = "responses"  # "responses": assistant tokens only; "all": every token
    cache_batch_tokens: int = 4096  # tokens per target forward while caching
    # The target's forward over the TRAINING data: "fp32", or "bf16" (autocast; 2-3x faster
    # on a CPU with AMX, greedy labels 99.4% the same). Validation data is always fp32.
    cache_precision: str = "fp32"
    # -- optimisation ---------------------------------------------------------------------
    epochs: float = 1.0
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch_size: int = 4  # sequences per forward/backward (gradient accumulation)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    head_weights: list[float] | None = None  # default 0.8 ** i (Medusa's)
    # Cheaper steps: each training step takes the heads' loss on this share of every
    # sequence's labelled positions, drawn anew each step (None: all; validation always
    # scores all). The LM-head projections are most of a step; neighbours teach alike.
    loss_positions_fraction: float | None = None
    # Train the heads only where the context lookup (min_match as speculative_config
    # ["lookup"]["min_match"]) finds no match: inside vLLM it drafts everywhere else, so the
    # heads never do (vllm_chimera/context_lookup.py). None: every position. Validation
    # scores every position and, separately, these.
    skip_lookup_matches: int | None = None
    # Distillation beyond the argmax label, from the cached h_{t+1+i} (loss.py; chimera and
    # medusa: EAGLE's own regression is a draft_overrides option): KL from the target's
    # next-token distribution (Medusa-2), smooth-L1 of each head's state onto h_{t+1+i} (EAGLE).
    kl_weight: float = 0.0
    regression_weight: float = 0.0
    grad_clip: float = 1.0
    # bf16 autocast of the draft's forward: "auto" (CUDA GPUs with bf16; CPUs stay fp32),
    # "bf16" (also a CPU with AMX / AVX-512-BF16; refused where bf16 is not native), "off".
    autocast: str = "auto"
    seed: int = 0
    # -- bookkeeping ----------------------------------------------------------------------
    save_every: int = 50  # steps between resumable checkpoints
    eval_every: int | None = None  # steps between validations (None: at the end only)
    stop_at_step: int | None = None  # stop (checkpointed, resumable) after this step
    resume: bool = True  # continue from output_dir's checkpoint if there is one
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True  # tqdm bar

    def __post_init__(self):
        problems = []
        if self.cache_precision not in ("fp32", "bf16"):
            problems.append(f"cache_precision must be 'fp32' or 'bf16', got {self.cache_precision!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            problems.append(f"autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if self.loss_on not in ("responses", "all"):
            problems.append(f"loss_on must be 'responses' or 'all', got {self.loss_on!r}")
        for name in ("num_heads", "batch_size", "micro_batch_size", "max_length", "save_every"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_length < 4:
            problems.append("max_length must be at least 4")
        if self.epochs <= 0:
            problems.append(f"epochs must be positive, got {self.epochs}")
        if self.head_weights is not None and len(self.head_weights) != self.num_heads:
            problems.append(f"head_weights has {len(self.head_weights)} entries for "
                            f"{self.num_heads} heads")
        if self.loss_positions_fraction is not None:
            if not 0 < self.loss_positions_fraction <= 1:
                problems.append("loss_positions_fraction must be in (0, 1], got "
                                f"{self.loss_positions_fraction}")
            if self.draft_kind == "eagle":  # its rollout and regression span every position
                problems.append("loss_positions_fraction is for parallel heads (chimera, "
                                "medusa), not eagle")
        if self.skip_lookup_matches is not None:
            if self.skip_lookup_matches < 1:
                problems.append("skip_lookup_matches (the lookup's min_match) must be >= 1, "
                                f"got {self.skip_lookup_matches}")
            if self.draft_kind == "eagle":  # its rollout and regression span every position
                problems.append("skip_lookup_matches is for parallel heads (chimera, medusa), "
                                "not eagle")
        for name in ("kl_weight", "regression_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
            elif getattr(self, name) and self.draft_kind == "eagle":
                problems.append(f"{name} is for parallel heads (chimera, medusa); EAGLE's own "
                                "regression is draft_overrides['regression_weight']")
        if self.draft_kind != "chimera":
            problems += self._peer_problems()
            if self.init_from:
                problems.append(f"init_from is for Chimera drafts, not {self.draft_kind}")
        if problems:
            raise ValueError("Invalid TrainingSettings: " + "; ".join(problems))

    def _peer_problems(self) -> list[str]:
        from vllm_chimera.training.peers import check_peer_options

        problems = check_peer_options(self.draft_kind, self.draft_overrides)
        for name in ("use_trigram_encoder", "use_context_encoder"):
            if not getattr(self, name):
                problems.append(f"{name}=False is a Chimera ablation, not a {self.draft_kind} option")
        return problems

    def weights(self) -> list[float]:
        return list(self.head_weights) if self.head_weights else [0.8 ** i for i in range(self.num_heads)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)
