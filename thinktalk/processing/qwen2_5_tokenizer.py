"""Qwen2.5-Omni's tokenizer files for checkpoints that lack them (the demo, tests): Qwen's byte-level BPE (the same
151,643 ranks as Qwen3's, processing/tokenizer.py) with Qwen2.5-Omni's own 22 added tokens at ids 151643..151664.

Qwen2.5-Omni renamed five of Qwen2's added tokens for its media: <|AUDIO|> 151646, <|audio_bos|> 151647,
<|audio_eos|> 151648, <|vision_bos|> 151652, <|vision_eos|> 151653, and spells the image and video pads <|IMAGE|>
151655 and <|VIDEO|> 151656: the ids its config.json names (config_qwen2_5.MropeLayout). The talker's text markers
(151859..151861) and the voices' bos tokens (151870, 151871) lie past the tokenizer, in the thinker's padded
vocabulary only, so they never come out of text and never decode to any.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tokenizer import (QWEN_FIRST_SPECIAL_ID, _RANKS_PACKAGE, _RANKS_RESOURCE, _assemble_backend,
                        _ranks_to_vocab_and_merges, _read_qwen_ranks, _tokenizer_config)

QWEN2_5_OMNI_ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
# Added but not special (kept by decode(skip_special_tokens=True)), as in Qwen2's tokenizer_config.
NON_SPECIAL = frozenset(("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                         "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"))


def build_qwen2_5_tokenizer_files(out_dir: str | Path) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` for Qwen2.5-Omni into `out_dir` (deterministic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _ranks_to_vocab_and_merges(_read_qwen_ranks())
    added = [(QWEN_FIRST_SPECIAL_ID + i, name, name not in NON_SPECIAL)
             for i, name in enumerate(QWEN2_5_OMNI_ADDED_TOKENS)]
    backend = _assemble_backend(vocab, merges, added, source=f"{_RANKS_PACKAGE}/{_RANKS_RESOURCE}")
    backend.save(str(out / "tokenizer.json"), pretty=False)
    config_text = json.dumps(_tokenizer_config(added), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(config_text + "\n", encoding="utf-8")
    return out
