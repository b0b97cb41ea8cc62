"""Qwen2.5-Omni (model_type `qwen2_5_omni`): the dense Thinker-Talker family, 3B and 7B."""
