"""Training of Chimera drafts by self-distillation from a frozen target (no vLLM here)."""
from vllm_chimera.training.settings import TrainingSettings
from vllm_chimera.training.trainer import train

__all__ = ["TrainingSettings", "train"]
