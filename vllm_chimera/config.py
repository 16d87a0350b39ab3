"""ChimeraConfig: the checkpoint config of a Chimera draft model.

A Chimera draft is useless without the target it was trained for: it reads the target's
embedding table, its final hidden states and its LM head. The config therefore records the
target (architecture, hidden size, vocabulary size) so that loading a draft against the
wrong target fails with a message instead of producing garbage drafts.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from chimera_kernels import ACTIVATION_FUNCTIONS
from vllm_chimera.target_layers import target_layer_ids_problem

ACTIVATIONS = tuple(ACTIVATION_FUNCTIONS)


class ChimeraConfig(PretrainedConfig):
    """Hyper-parameters of the draft: its design, the same on every machine (the Chimera
    paper, arXiv 2402.15758; docs/design/ for this project's additions). What is measured
    of a draft on a machine lives beside its config.json: measurements.py.

    The encoder layer has the target's shape by default (one Llama-style decoder layer:
    RMSNorm, RoPE, GQA, gated MLP, or num_encoder_layers of them); its MLP may be narrower.

    Args:
        target_architecture: e.g. "LlamaForCausalLM", the target's `architectures[0]`.
        target_model_type: e.g. "llama".
        hidden_size: d, the target's hidden size (the draft works in the same space).
        vocab_size: V, the target's vocabulary size (the LM head's output size).
        num_decoding_heads: K, the number of parallel residual heads; head i predicts
            the token i+2 positions after the position it reads.
        num_attention_heads, num_key_value_heads, head_dim: the encoder layer's attention.
        intermediate_size: the encoder layer's gated-MLP width.
        head_intermediate_size: the hidden width of each residual head R_i (2d -> this -> d).
        trigram_activation: the activation between W1 and W2 of the trigram encoder.
        hidden_act: the encoder layer's MLP activation.
        draft_vocab_size: if set, the heads project onto this many of the target's tokens
            (the most frequent ones) with their own LM head; `draft_to_target_ids` in the
            weights maps draft ids back to target ids.
        use_trigram_encoder, use_context_encoder: the paper's ablations. Without the trigram
            encoder z_t = W_f h_t; without the context encoder s_t = 0 and the heads are
            Medusa-style residual heads on the target's hidden state alone.
        sequential_heads: Hydra's lesson (arXiv 2402.05109), off in the paper's design: head
            i's first layer also reads the target's embedding of the token before its own
            target, x_{t+1} for head 0 and head i-1's draft for the others (teacher-forced in
            training), so later heads know what the earlier ones drafted. Still one encoder
            pass; the heads then run one after another (training, the reference decoder and
            vLLM, chain and tree: a head's other candidates are its alternatives given the
            top-1 chain; docs/design/sequential_heads.md).
        target_layer_ids: EAGLE-3's lesson, off in the paper's design: the draft also reads
            the target's residual stream at these layers (target_layers.py; e.g. [2, 15, 27]
            of 30), fused into h_t wherever the draft reads it: h_t + W_l [norm(l_1); ..].
            Inside vLLM they arrive as EAGLE-3's aux hidden states
            (`eagle_aux_hidden_state_layer_ids`).
        target_num_hidden_layers: the target's number of decoder layers (recorded so that
            target_layer_ids can be checked against the target and vLLM asked for them).
        num_encoder_layers: depth of the full-context encoder, 1 in the paper's design. The
            first layer is `layer`; the others (`extra_layers`) stack on it, each with its
            own KV cache, before the one final norm.
    """

    model_type = "chimera"
    # The keys under which drafts saved before measurements.json carried what chimera-bench
    # measured: accepted when read (measurements.py reads them), never kept or written.
    MEASURED_FIELDS = ("step_aside_schedules", "head_top_k_accuracies", "tree_step_seconds",
                       "tree_schedules")

    def design_differences(self, other: "ChimeraConfig", ignored=()) -> list[str]:
        """The fields (sorted) in which two drafts' designs differ: versions and `ignored`
        aside. Both init_from and averaging refuse a draft by these."""
        skip = {"transformers_version", "architectures"} | set(ignored)
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in set(mine) | set(theirs)
                      if k not in skip and mine.get(k) != theirs.get(k))

    def __init__(
        self,
        target_architecture: str = "LlamaForCausalLM",
        target_model_type: str = "llama",
        hidden_size: int = 576,
        vocab_size: int = 49152,
        num_decoding_heads: int = 4,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int | None = None,
        intermediate_size: int = 1536,
        head_intermediate_size: int | None = None,
        trigram_activation: str = "silu",
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 8192,
        draft_vocab_size: int | None = None,
        initializer_range: float = 0.02,
        use_trigram_encoder: bool = True,
        use_context_encoder: bool = True,
        sequential_heads: bool = False,
        target_layer_ids: list[int] | None = None,
        target_num_hidden_layers: int | None = None,
        num_encoder_layers: int = 1,
        **kwargs,
    ):
        self.target_architecture = target_architecture
        self.target_model_type = target_model_type
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_decoding_heads = num_decoding_heads
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.head_intermediate_size = head_intermediate_size or hidden_size
        self.trigram_activation = trigram_activation
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.draft_vocab_size = draft_vocab_size
        self.initializer_range = initializer_range
        self.use_trigram_encoder = use_trigram_encoder
        self.use_context_encoder = use_context_encoder
        self.sequential_heads = sequential_heads
        self.target_layer_ids = list(target_layer_ids) if target_layer_ids else None
        self.target_num_hidden_layers = target_num_hidden_layers
        self.num_encoder_layers = num_encoder_layers
        for name in self.MEASURED_FIELDS:  # (an older config.json's: measurements.py)
            kwargs.pop(name, None)
        kwargs.setdefault("architectures", ["ChimeraDraftModel"])
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on a config no model could be built from."""
        problems = []
        for name in ("hidden_size", "vocab_size", "num_decoding_heads", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size",
                     "head_intermediate_size", "num_encoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        for name in ("use_trigram_encoder", "use_context_encoder", "sequential_heads"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("trigram_activation", "hidden_act"):
            if getattr(self, name) not in ACTIVATIONS:
                problems.append(f"{name} must be one of {ACTIVATIONS}, got {getattr(self, name)!r}")
        if (isinstance(self.num_encoder_layers, int) and self.num_encoder_layers > 1
                and not self.use_context_encoder):
            problems.append(f"num_encoder_layers {self.num_encoder_layers} needs the context "
                            "encoder (use_context_encoder)")
        if self.draft_vocab_size is not None and not (0 < self.draft_vocab_size <= self.vocab_size):
            problems.append(f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}], "
                            f"got {self.draft_vocab_size!r}")
        if self.target_layer_ids is not None:
            if not isinstance(self.target_num_hidden_layers, int):
                problems.append("target_layer_ids need target_num_hidden_layers (the target's "
                                f"layer count), got {self.target_num_hidden_layers!r}")
            problem = target_layer_ids_problem(self.target_layer_ids, self.target_num_hidden_layers)
            if problem:
                problems.append(f"target_layer_ids {problem}")
        if problems:
            raise ValueError("Invalid ChimeraConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        """The design, as config.json holds it: never a measured field, whoever set one."""
        output = super().to_dict()
        for name in self.MEASURED_FIELDS:
            output.pop(name, None)
        return output

    @classmethod
    def for_target(cls, target_config: PretrainedConfig, **overrides) -> "ChimeraConfig":
        """A draft config shaped like `target_config` (a Llama-family HF config).

        The encoder layer copies the target's attention shape and RoPE; anything in
        `overrides` (e.g. num_decoding_heads=5, intermediate_size=768) wins.
        """
        text_config = getattr(target_config, "text_config", None) or target_config
        architectures = getattr(target_config, "architectures", None) or ["unknown"]
        rope_theta = getattr(text_config, "rope_theta", None)
        if rope_theta is None:  # transformers 5 keeps it in rope_parameters
            rope_theta = (getattr(text_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        values = dict(
            target_architecture=architectures[0],
            target_model_type=target_config.model_type,
            hidden_size=text_config.hidden_size,
            vocab_size=text_config.vocab_size,
            num_attention_heads=text_config.num_attention_heads,
            num_key_value_heads=getattr(text_config, "num_key_value_heads", None)
            or text_config.num_attention_heads,
            head_dim=getattr(text_config, "head_dim", None),
            intermediate_size=text_config.intermediate_size,
            rms_norm_eps=getattr(text_config, "rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            max_position_embeddings=getattr(text_config, "max_position_embeddings", 8192),
            target_num_hidden_layers=getattr(text_config, "num_hidden_layers", None),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def eagle_aux_hidden_state_layer_ids(self) -> list[int] | None:
        """The layers vLLM's runner hands the proposer as aux hidden states (it reads this
        name from the draft's config): target_layer_ids, then the last layer's output,
        from which the proposer recomputes h_t (the runner then passes nothing else)."""
        if not self.target_layer_ids:
            return None
        return [*self.target_layer_ids, self.target_num_hidden_layers]

    def target_mismatches(self, target_config: PretrainedConfig) -> list[str]:
        """What differs between the target this draft was trained for and `target_config`."""
        text_config = getattr(target_config, "text_config", None) or target_config
        architectures = getattr(target_config, "architectures", None) or []
        found = {
            "architecture": architectures[0] if architectures else None,
            "hidden size": text_config.hidden_size,
            "vocabulary size": text_config.vocab_size,
        }
        expected = {
            "architecture": self.target_architecture,
            "hidden size": self.hidden_size,
            "vocabulary size": self.vocab_size,
        }
        if self.target_layer_ids:  # it reads layers by number
            found["number of layers"] = getattr(text_config, "num_hidden_layers", None)
            expected["number of layers"] = self.target_num_hidden_layers
        return [
            f"{what}: draft trained for {expected[what]!r}, target has {found[what]!r}"
            for what in expected
            # An unnamed architecture (e.g. a config built in code) is not held against it.
            if found[what] is not None and found[what] != expected[what]
        ]
