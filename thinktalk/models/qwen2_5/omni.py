"""The whole Qwen2.5-Omni network: thinker, and (when the checkpoint speaks) talker and token2wav.

Its state_dict names equal the released checkpoint's keys one to one (no fused tensors, unlike Qwen3-Omni's
experts), so weights.load_weights / checkpoint_layout take it as it is. The voices are not weights: they come from
the checkpoint's spk_dict.pt (voices.py).
"""

from torch import nn

from ...config_qwen2_5 import Qwen25OmniConfig
from .talker import Qwen25Talker
from .thinker import Qwen25Thinker
from .token2wav import Token2Wav

# Checkpoint prefixes of the speech side: what a load with audio output off skips (weights.load_weights'
# skip_prefixes), so a thinker-only model loads from a full checkpoint.
SPEECH_PREFIXES = ("talker.", "token2wav.")


class Qwen25OmniModel(nn.Module):
    def __init__(self, cfg: Qwen25OmniConfig, audio_output: bool):
        super().__init__()
        self.cfg = cfg
        self.thinker = Qwen25Thinker(cfg.thinker)
        self.talker = None
        self.token2wav = None
        if audio_output:
            if not cfg.has_audio_output:
                raise ValueError("audio output was requested but this checkpoint has no talker/token2wav "
                                 "(enable_audio_output is false or its sections are absent)")
            self.talker = Qwen25Talker(cfg.talker)
            self.token2wav = Token2Wav(cfg.token2wav)
