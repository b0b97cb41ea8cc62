"""A cancelled request stops between the groups of its media's encoding, not only between scheduler iterations:
a long clip's or video's remaining groups never run. Counted from the encoders' own group calls, never the clock."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from media import tone
from PIL import Image

from thinktalk import Omni
from thinktalk.errors import Cancelled
from thinktalk.events import Failed
from thinktalk.models.audio_encoder import AudioEncoder
from thinktalk.models.vision_encoder import VisionEncoder
from thinktalk.processing.vision import image_patches

LONG_AUDIO_SECONDS = 360.0  # 4,680 audio tokens: two groups of the audio encoder (GROUP_TOKENS = 4096)


@pytest.fixture(scope="module")
def omni(tiny) -> Omni:
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


def counting(monkeypatch, cls, method: str, on_call=None) -> list[int]:
    calls: list[int] = []
    original = getattr(cls, method)

    def counted(self, *args, **kwargs):
        calls.append(1)
        if on_call is not None:
            on_call(len(calls))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(cls, method, counted)
    return calls


def test_the_audio_encoder_stops_between_groups(omni, monkeypatch):
    groups = counting(monkeypatch, AudioEncoder, "_run_layers")
    features = [torch.randn(omni.cfg.thinker.audio.num_mel_bins, 3000)]  # 30 s: several attention windows
    tower = omni.model.thinker.audio_tower
    with torch.inference_mode():
        tower(features, group_tokens=40)
        whole = len(groups)
        groups.clear()
        with pytest.raises(Cancelled, match="audio encoder stopped between groups"):
            tower(features, group_tokens=40, should_stop=lambda: len(groups) >= 2)
    assert whole > 3 and len(groups) == 2  # it ran two groups of many, then stopped


def test_the_vision_encoder_stops_between_groups(omni, monkeypatch):
    groups = counting(monkeypatch, VisionEncoder, "_run_group")
    frames = [image_patches(Image.fromarray(np.full((64, 64, 3), shade, np.uint8)))
              for shade in (10, 90, 170, 250)]
    patches = torch.cat([p for p, _ in frames])
    grids = torch.cat([g for _, g in frames])
    with torch.inference_mode(), pytest.raises(Cancelled, match="vision encoder"):
        omni.model.thinker.visual(patches, grids, group_patches=1, should_stop=lambda: len(groups) >= 1)
    assert len(groups) == 1  # one image of four


def test_a_request_cancelled_while_its_audio_encodes_stops_there(omni, monkeypatch):
    """The scheduler's encoder unit is one media item; a cancel arriving inside a long clip ends it after the group
    running then, with no Failed event (a cancel is nobody's error), and its row is free at the next iteration."""
    events: list = []
    messages = [{"role": "user", "content": [{"type": "audio", "audio": (tone(LONG_AUDIO_SECONDS), 16000)},
                                             {"type": "text", "text": "Summarise."}]}]
    omni.enable_batching(rows=2, max_len=256)
    stream = omni.submit(omni.request(messages, max_new_tokens=4, return_audio=False), events.append)
    groups = counting(monkeypatch, AudioEncoder, "_run_layers", on_call=lambda n: stream.cancel())
    omni.iterate()  # admits the stream and starts its audio: the first group runs, the cancel arrives meanwhile
    assert len(groups) == 1  # the second group never ran
    omni.iterate()
    assert not omni.busy and not any(isinstance(event, Failed) for event in events)
    omni.disable_batching()
