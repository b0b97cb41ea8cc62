"""thinktalk: a from-scratch PyTorch engine for the Qwen3-Omni Thinker-Talker models."""
