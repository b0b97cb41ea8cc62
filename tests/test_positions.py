"""TM-RoPE positions against the reference's get_rope_index, for many prompt shapes."""

import pytest
import torch

from thinktalk.config import parse_config
from thinktalk.models.audio_encoder import audio_token_count
from thinktalk.processing.positions import MediaLayout, PositionError, VideoGrid, rope_positions

TEXT = 9707  # any ordinary token id


@pytest.fixture(scope="module")
def cfg(tiny):
    return parse_config(tiny.config).thinker


def build(segments, cfg):
    """Token ids for a list of segments, laid out as the reference processor expands placeholders.

    ("text", n) | ("audio", mel_frames) | ("image", (t, h, w)) | ("video", (t, h, w), seconds_per_grid)
    | ("video+audio", (t, h, w), seconds_per_grid, mel_frames). Returns (ids, layout, mel frame counts)."""
    ids, audios, frames, images, videos = [], [], [], [], []
    merge, per_second = cfg.vision.spatial_merge_size, cfg.position_id_per_seconds
    for kind, *spec in segments:
        if kind == "text":
            ids += [TEXT] * spec[0]
        elif kind == "audio":
            count = audio_token_count(spec[0], cfg.audio.n_window)
            audios.append(count), frames.append(spec[0])
            ids += [cfg.audio_start_token_id] + [cfg.audio_token_id] * count + [cfg.audio_end_token_id]
        elif kind == "image":
            images.append(spec[0])
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (spec[0][0] * spec[0][1] * spec[0][2]
                                                                         // merge**2) + [cfg.vision_end_token_id]
        elif kind == "video":
            videos.append(VideoGrid(spec[0], spec[1]))
            count = spec[0][0] * spec[0][1] * spec[0][2] // merge**2
            ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * count + [cfg.vision_end_token_id]
        else:  # video with its audio track: video tokens interleaved with audio tokens by time
            grid, seconds, mel = spec
            videos.append(VideoGrid(grid, seconds))
            count = audio_token_count(mel, cfg.audio.n_window)
            audios.append(count), frames.append(mel)
            per_frame = grid[1] * grid[2] // merge**2
            video_t = [f * seconds * per_second for f in range(grid[0]) for _ in range(per_frame)]
            body, v, a = [], 0, 0
            while v < len(video_t) or a < count:
                if a >= count or (v < len(video_t) and video_t[v] <= a):
                    body.append(cfg.video_token_id)
                    v += 1
                else:
                    body.append(cfg.audio_token_id)
                    a += 1
            ids += [cfg.vision_start_token_id, cfg.audio_start_token_id] + body + [cfg.audio_end_token_id,
                                                                                   cfg.vision_end_token_id]
    return ids, MediaLayout(tuple(audios), tuple(images), tuple(videos)), frames


def reference_positions(reference, ids, layout, frames, use_audio_in_video):
    tensor = torch.tensor([ids])
    with torch.no_grad():
        positions, delta = reference.thinker.model.get_rope_index(
            tensor,
            image_grid_thw=torch.tensor(layout.image_grids) if layout.image_grids else None,
            video_grid_thw=torch.tensor([v.grid_thw for v in layout.videos]) if layout.videos else None,
            attention_mask=torch.ones_like(tensor),
            use_audio_in_video=use_audio_in_video,
            audio_seqlens=torch.tensor(frames) if frames else None,
            second_per_grids=torch.tensor([v.seconds_per_grid for v in layout.videos]) if layout.videos else None,
        )
    return positions[:, 0], float(delta.reshape(-1)[0])


SHAPES = {
    "text only": [("text", 12)],
    "one audio": [("text", 3), ("audio", 250), ("text", 4)],
    "two audios": [("text", 2), ("audio", 100), ("text", 1), ("audio", 777), ("text", 3)],
    "one image": [("text", 3), ("image", (1, 4, 6)), ("text", 5)],
    "images of different sizes": [("image", (1, 2, 2)), ("text", 1), ("image", (1, 8, 4)), ("image", (1, 6, 6))],
    "a video": [("text", 2), ("video", (3, 4, 4), 1.0), ("text", 2)],
    "a video at an uneven fps": [("text", 2), ("video", (4, 2, 4), 2 / 1.5), ("text", 2)],
    "everything in one turn": [("text", 2), ("audio", 320), ("image", (1, 4, 4)), ("video", (2, 4, 2), 1.0),
                               ("text", 6)],
    "long audio (> 30 s)": [("text", 4), ("audio", 4567), ("text", 3)],
}
AUDIO_IN_VIDEO = {
    "a video with its audio": [("text", 3), ("video+audio", (4, 4, 4), 1.0, 400), ("text", 2)],
    "video with audio, and more": [("audio", 150), ("text", 1), ("video+audio", (2, 2, 2), 2.0, 150),
                                   ("image", (1, 2, 4)), ("text", 2)],
}


@pytest.mark.parametrize("name", SHAPES)
def test_positions_match_reference(name, cfg, tiny):
    ids, layout, frames = build(SHAPES[name], cfg)
    ours, delta = rope_positions(ids, layout, cfg)
    # The reference only builds 3-D positions when an image or video is present; otherwise plain arange.
    if layout.image_grids or layout.videos:
        theirs, their_delta = reference_positions(tiny.reference, ids, layout, frames, False)
    else:
        theirs, their_delta = torch.arange(len(ids), dtype=torch.float32).expand(3, -1), 0.0
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    assert delta == pytest.approx(their_delta, abs=1e-5)


@pytest.mark.parametrize("name", AUDIO_IN_VIDEO)
def test_audio_in_video_positions_match_reference(name, cfg, tiny):
    ids, layout, frames = build(AUDIO_IN_VIDEO[name], cfg)
    ours, delta = rope_positions(ids, layout, cfg, use_audio_in_video=True)
    theirs, their_delta = reference_positions(tiny.reference, ids, layout, frames, True)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    assert delta == pytest.approx(their_delta, abs=1e-5)


def test_mismatched_media_is_an_error(cfg):
    ids, layout, _ = build([("text", 2), ("image", (1, 4, 4))], cfg)
    with pytest.raises(PositionError, match="more image placeholders"):
        rope_positions(ids, MediaLayout(), cfg)
    with pytest.raises(PositionError, match="more audio inputs than placeholders"):
        rope_positions(ids, MediaLayout(audio_token_counts=(5,), image_grids=layout.image_grids), cfg)
    with pytest.raises(PositionError, match="do not match"):
        rope_positions(ids, MediaLayout(image_grids=((1, 2, 2),)), cfg)
