"""The voices of a Qwen2.5-Omni checkpoint: its `spk_dict.pt`, read without running pickled code.

Layout: {name: {"bos_token": int, "cond": (1, enc_emb_dim) or (enc_emb_dim,), "ref_mel": (1, frames, mel_dim) or
(frames, mel_dim)}}; the released checkpoints hold Chelsie (the reference's default) and Ethan. `torch.load` runs
with `weights_only=True`, whose unpickler builds only tensors and plain containers and refuses anything else, so a
tampered file fails instead of executing code. Names are looked up case-insensitively.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config_qwen2_5 import DiTConfig

SPEAKER_FILE = "spk_dict.pt"
DEFAULT_VOICE = "Chelsie"


class VoiceError(ValueError):
    """The speaker file is missing, unreadable or malformed, or a voice is unknown."""


@dataclass(frozen=True)
class Voice:
    name: str
    bos_token: int  # thinker-vocabulary token that opens the reply in the talker's prompt
    cond: torch.Tensor  # (1, enc_emb_dim) float32
    ref_mel: torch.Tensor  # (1, ref_frames, mel_dim) float32


@dataclass(frozen=True)
class VoiceBank:
    voices: tuple[Voice, ...]  # in file order

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.voices)

    def get(self, name: str | None = None) -> Voice:
        """The voice called `name` (any case); None: Chelsie if present, else the first."""
        wanted = (DEFAULT_VOICE if DEFAULT_VOICE.lower() in (n.lower() for n in self.names) else self.names[0]) \
            if name is None else name
        for voice in self.voices:
            if voice.name.lower() == wanted.lower():
                return voice
        raise VoiceError(f"unknown voice {name!r}; available voices: {', '.join(self.names)}")


def load_voices(checkpoint_dir: Path | str, dit: DiTConfig) -> VoiceBank:
    """Read and check `spk_dict.pt` of a checkpoint directory against the DiT's widths."""
    path = Path(checkpoint_dir) / SPEAKER_FILE
    if not path.is_file():
        raise VoiceError(f"{path}: missing; a Qwen2.5-Omni checkpoint needs its speaker file to speak (load it with "
                         "audio output off to use it for text only)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise VoiceError(f"{path}: not a loadable speaker file (only tensors, numbers and dicts are accepted): "
                         f"{error}") from None
    if not isinstance(data, dict) or not data:
        raise VoiceError(f"{path}: must map voice names to their tensors, got {type(data).__name__}")
    return VoiceBank(tuple(_voice(path, name, entry, dit) for name, entry in data.items()))


def _voice(path: Path, name, entry, dit: DiTConfig) -> Voice:
    where = f"{path}: voice {name!r}"
    if not isinstance(name, str) or not isinstance(entry, dict):
        raise VoiceError(f"{where}: must be a name mapping to a dict of bos_token, cond and ref_mel")
    missing = [key for key in ("bos_token", "cond", "ref_mel") if key not in entry]
    if missing:
        raise VoiceError(f"{where}: lacks {', '.join(missing)}")
    bos = entry["bos_token"]
    if isinstance(bos, torch.Tensor) and bos.numel() == 1:
        bos = int(bos.item())
    if isinstance(bos, bool) or not isinstance(bos, int) or bos < 0:
        raise VoiceError(f"{where}: bos_token must be a token id, got {bos!r}")
    cond = _tensor(where, "cond", entry["cond"], (dit.enc_emb_dim,))
    ref_mel = _tensor(where, "ref_mel", entry["ref_mel"], (None, dit.mel_dim))
    return Voice(name=name, bos_token=bos, cond=cond, ref_mel=ref_mel)


def _tensor(where: str, key: str, value, shape: tuple[int | None, ...]) -> torch.Tensor:
    """A float tensor of `shape` (None: any size >= 1), with an optional leading batch axis of 1 -> batch of 1."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise VoiceError(f"{where}: {key} must be a float tensor, got {type(value).__name__}")
    tensor = value[0] if value.dim() == len(shape) + 1 and value.shape[0] == 1 else value
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)) \
            or tensor.shape[0] < 1:
        expected = ", ".join("n" if s is None else str(s) for s in shape)
        raise VoiceError(f"{where}: {key} has shape {list(value.shape)}, expected ({expected}) or (1, {expected})")
    if not bool(torch.isfinite(tensor).all()):
        raise VoiceError(f"{where}: {key} holds NaN or infinite values")
    return tensor.float().unsqueeze(0)
