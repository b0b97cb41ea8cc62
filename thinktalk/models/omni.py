"""The whole Qwen3-Omni network: thinker, and (when the checkpoint speaks) talker and code2wav.

Its state_dict names equal the checkpoint's keys, except that MoE experts are held fused (see thinktalk/weights.py).
"""

from torch import nn

from ..config import OmniConfig
from .code2wav import Code2Wav
from .talker import Talker
from .thinker import Thinker


class OmniModel(nn.Module):
    def __init__(self, cfg: OmniConfig, audio_output: bool):
        super().__init__()
        self.cfg = cfg
        self.thinker = Thinker(cfg.thinker)
        self.talker = None
        self.code2wav = None
        if audio_output:
            if not cfg.has_audio_output:
                raise ValueError("audio output was requested but this checkpoint has no talker/code2wav "
                                 "(a thinker-only model such as -Thinking or -Captioner)")
            self.talker = Talker(cfg.talker)
            self.code2wav = Code2Wav(cfg.code2wav)
