"""Sampling settings and the reference's defaults for them (thinker, talker, code predictor), parsed from a
checkpoint's `generation_config.json` (see config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .config_reader import ConfigError, FieldReader


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; `do_sample=False` is greedy and ignores the rest."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 1024

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# The reference's defaults when a checkpoint ships no generation_config.json (see REFERENCE.md): the thinker
# decodes greedily up to 1,024 tokens; the talker samples (top_k 50, temperature 0.9, repetition penalty 1.05).
DEFAULT_THINKER_SAMPLING = SamplingConfig(max_new_tokens=1024)
DEFAULT_TALKER_SAMPLING = SamplingConfig(
    do_sample=True, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05, max_new_tokens=4096
)


# The reference hard-codes its code predictor's sampling: it follows the talker's do_sample, draws with top_k 50 and
# top_p 0.8 at temperature 1, and applies no repetition penalty.
CODE_PREDICTOR_TOP_K = 50
CODE_PREDICTOR_TOP_P = 0.8


def code_predictor_sampling(talker: SamplingConfig) -> SamplingConfig:
    return SamplingConfig(do_sample=talker.do_sample, temperature=1.0, top_k=CODE_PREDICTOR_TOP_K,
                          top_p=CODE_PREDICTOR_TOP_P, repetition_penalty=1.0, max_new_tokens=1)


def parse_sampling(f: FieldReader, base: SamplingConfig, prefix: str = "") -> SamplingConfig:
    def pick(name, reader):
        key = prefix + name
        return reader(key) if f.has(key) else getattr(base, name)

    # Type errors are raised by the readers (already naming file and key); range errors by SamplingConfig, whose
    # messages start with the bare field name, so the key's prefix (e.g. talker_) is added back here.
    values = dict(
        do_sample=pick("do_sample", f.bool),
        temperature=pick("temperature", f.float),
        top_k=pick("top_k", f.int),
        top_p=pick("top_p", f.float),
        repetition_penalty=pick("repetition_penalty", f.float),
        max_new_tokens=pick("max_new_tokens", f.int),
    )
    try:
        return SamplingConfig(**values)
    except ValueError as error:
        raise ConfigError(f"{f.file}: {prefix}{error}") from None
