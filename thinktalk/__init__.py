"""thinktalk: a from-scratch PyTorch engine for the Qwen3-Omni Thinker-Talker models."""

from .omni import GenerationResult, Omni

__all__ = ["Omni", "GenerationResult"]
