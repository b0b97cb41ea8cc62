"""The Thinker with audio, image and video inputs against the reference: logits and greedy generation."""

import pytest
import torch
from media import noise_image, tone, write_video

from thinktalk import Omni
from thinktalk.engine.multimodal_inputs import multimodal_prefill_inputs

ATOL = 1e-4


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=3.0, fps=4)


def conversations(clip):
    frames = [noise_image(64, 96, seed=s) for s in range(4)]
    return {
        "audio": ([{"role": "user", "content": [{"type": "audio", "audio": (tone(1.7), 16000)},
                                                 {"type": "text", "text": "What is this sound?"}]}], False),
        "two audios": ([{"role": "user", "content": [{"type": "audio", "audio": (tone(0.6, hz=300), 16000)},
                                                      {"type": "audio", "audio": (tone(2.3, seed=2), 16000)},
                                                      {"type": "text", "text": "Compare."}]}], False),
        "image": ([{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "image", "image": noise_image(80, 48, seed=3)},
                                                {"type": "text", "text": "Describe."}]}], False),
        "video frames + image + audio": ([{"role": "user", "content": [
            {"type": "video", "video": frames}, {"type": "image", "image": noise_image(32, 64, seed=9)},
            {"type": "audio", "audio": (tone(1.1), 16000)}, {"type": "text", "text": "All of it?"}]}], False),
        "video with its audio": ([{"role": "user", "content": [{"type": "video", "video": str(clip)},
                                                                {"type": "text", "text": "What happens?"}]}], True),
    }


def reference_inputs(prompt) -> dict:
    """The same media, already featurised/patched by thinktalk, in the reference model's input format."""
    ids = torch.tensor([prompt.token_ids])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_audio_in_video=prompt.use_audio_in_video)
    if prompt.audios:
        frames = [a.features.shape[1] for a in prompt.audios]
        features = torch.zeros(len(frames), prompt.audios[0].features.shape[0], max(frames))
        mask = torch.zeros(len(frames), max(frames), dtype=torch.long)
        for i, a in enumerate(prompt.audios):
            features[i, :, : frames[i]], mask[i, : frames[i]] = a.features, 1
        inputs.update(input_features=features, feature_attention_mask=mask)
    if prompt.images:
        inputs.update(pixel_values=torch.cat([i.patches for i in prompt.images]),
                      image_grid_thw=torch.tensor([i.grid_thw for i in prompt.images]))
    if prompt.videos:
        inputs.update(pixel_values_videos=torch.cat([v.patches for v in prompt.videos]),
                      video_grid_thw=torch.tensor([v.grid_thw for v in prompt.videos]),
                      video_second_per_grid=torch.tensor([v.seconds_per_grid for v in prompt.videos]))
    return inputs


def our_logits(omni, prompt) -> torch.Tensor:
    with torch.inference_mode():
        inputs = multimodal_prefill_inputs(omni.model.thinker, [prompt])
        logits, _, _ = omni.model.thinker(inputs.embeds, inputs.positions, after_layer=inputs.after_layer)
    return logits[0]


NAMES = ["audio", "two audios", "image", "video frames + image + audio", "video with its audio"]


@pytest.mark.parametrize("name", NAMES)
def test_multimodal_logits_match_reference(name, omni, tiny, clip):
    messages, use_audio_in_video = conversations(clip)[name]
    prompt = omni.prepare(messages, use_audio_in_video)
    assert prompt.has_media
    with torch.no_grad():
        theirs = tiny.reference.thinker(**reference_inputs(prompt)).logits[0]
    torch.testing.assert_close(our_logits(omni, prompt), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["image", "video frames + image + audio", "video with its audio"])
def test_multimodal_greedy_generation_matches_reference(name, omni, tiny, clip):
    messages, use_audio_in_video = conversations(clip)[name]
    prompt = omni.prepare(messages, use_audio_in_video)
    with torch.no_grad():
        out = tiny.reference.thinker.generate(**reference_inputs(prompt), max_new_tokens=32, min_new_tokens=32,
                                              do_sample=False)
    expected = out[0, len(prompt.token_ids):].tolist()
    result = omni.generate(messages, use_audio_in_video=use_audio_in_video, max_new_tokens=32, do_sample=False,
                           stop_token_ids=[-1])
    assert result.token_ids == expected


def test_batch_mixing_media_and_text_matches_each_row_alone(omni, clip):
    batch = [conversations(clip)["image"][0], [{"role": "user", "content": "Just text, a bit longer than that."}],
             conversations(clip)["audio"][0]]
    together = omni.generate(batch, max_new_tokens=12, do_sample=False, stop_token_ids=[-1])
    for messages, result in zip(batch, together):
        alone = omni.generate(messages, max_new_tokens=12, do_sample=False, stop_token_ids=[-1])
        assert result.token_ids == alone.token_ids
