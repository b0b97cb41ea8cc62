"""Qwen2.5-Omni's TM-RoPE positions: token ids + media metadata -> 3-D (T, H, W) position ids and the rope delta.

Walking the prompt left to right, with `next` the position after everything placed so far:
  - a text token, and every media start/end marker, takes t = h = w = next;
  - an audio's tokens take consecutive ids from `next` on all three axes (one token = 40 ms = one temporal id);
  - an image's tokens take t = next, h = next + row, w = next + column over the merged patch grid;
  - a video's tokens take t = next + int(frame * seconds_per_grid * 25) (truncated, as the reference's .long()),
    h and w as an image's;
  - a video with its audio (use_audio_in_video): the two start markers share one id, then both runs start at
    `next`; each is cut into chunks of seconds_per_chunk * 25 temporal ids (`chunk_bounds`), and the prompt holds
    video chunk 0, audio chunk 0, video chunk 1, audio chunk 1, ... (what is left of the longer run at the end);
    the two end markers share one id;
  - after a media item, `next` = 1 + the largest id it used.
Ids are integers (Qwen3-Omni's are fractional: processing/positions.py). `rope_delta` = largest + 1 - prompt
length: a decode step at cache slot s sits at position s + rope_delta. The talker computes its positions with the
same walk over the thinker's ids, with its own copy of the layout. Pure functions: no model is imported.
"""

from __future__ import annotations

import torch

from ..config_qwen2_5 import MropeLayout
from .positions import MediaLayout, PositionError, VideoGrid

__all__ = ["MediaLayout", "PositionError", "VideoGrid", "chunk_bounds", "qwen2_5_rope_positions",
           "video_with_audio_tokens"]


def chunk_bounds(temporal: list[int], per_chunk: int) -> list[tuple[int, int]]:
    """Cut a run of nondecreasing temporal ids (relative to the run's start) into chunks: chunk c ends before the
    first id >= (c + 1) * per_chunk, scanning once. As in the reference, the chunk counter advances by one per token
    that crosses it, so an id jumping over several boundaries opens several (possibly one-token) chunks in a row."""
    bounds, start, chunk = [], 0, 1
    for i, value in enumerate(temporal):
        if value >= chunk * per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(temporal)))
    return bounds


def vision_positions(grid_thw: tuple[int, int, int], merge: int, seconds_per_grid: float,
                     per_second: int) -> torch.Tensor:
    """(3, t*h*w/merge^2) long positions of one image or video from 0, in the encoder's order (frame, row, col)."""
    frames, rows, cols = grid_thw[0], grid_thw[1] // merge, grid_thw[2] // merge
    # float32 products then truncation, as the reference computes them
    t = (torch.arange(frames) * torch.tensor(seconds_per_grid, dtype=torch.float32) * per_second).long()
    t = t.view(-1, 1, 1).expand(frames, rows, cols)
    h = torch.arange(rows).view(1, -1, 1).expand(frames, rows, cols)
    w = torch.arange(cols).view(1, 1, -1).expand(frames, rows, cols)
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)])


def _interleaved(video: torch.Tensor, audio: torch.Tensor, per_chunk: int) -> tuple[torch.Tensor, list[str]]:
    """Video chunk 0, audio chunk 0, video chunk 1, ... -> (positions (3, n), kinds in prompt order)."""
    video_chunks = chunk_bounds(video[0].tolist(), per_chunk)
    audio_chunks = chunk_bounds(audio[0].tolist(), per_chunk)
    columns, kinds = [], []
    for j in range(max(len(video_chunks), len(audio_chunks))):
        for run, chunks, kind in ((video, video_chunks, "video"), (audio, audio_chunks, "audio")):
            if j < len(chunks):
                start, stop = chunks[j]
                columns.append(run[:, start:stop])
                kinds += [kind] * (stop - start)
    return torch.cat(columns, dim=1), kinds


def video_with_audio_tokens(video: VideoGrid, audio_tokens: int, layout: MropeLayout) -> list[int]:
    """The placeholder ids between the two start and the two end markers of a video with its audio, in prompt order
    (what the processor writes): video and audio tokens interleaved chunk by chunk."""
    video_pos = vision_positions(video.grid_thw, layout.spatial_merge_size, video.seconds_per_grid,
                                 layout.position_id_per_seconds)
    audio_pos = torch.arange(audio_tokens).expand(3, -1)
    _, kinds = _interleaved(video_pos, audio_pos, layout.position_id_per_seconds * layout.seconds_per_chunk)
    return [layout.video_token_id if kind == "video" else layout.audio_token_id for kind in kinds]


class _Walk:
    def __init__(self):
        self.columns: list[torch.Tensor] = []
        self.next = 0

    def text(self, count: int) -> None:
        if count > 0:
            self.columns.append((torch.arange(count) + self.next).expand(3, -1))
            self.next += count

    def shared(self, copies: int) -> None:
        """Markers that share one position (the two start or end markers of a video with audio)."""
        self.columns.append(torch.full((3, copies), self.next))
        self.next += 1

    def block(self, positions: torch.Tensor) -> None:
        """Media positions relative to `next`."""
        if positions.numel():
            self.columns.append(positions + self.next)
            self.next = self.next + int(positions.max()) + 1


def _expect(ids: list[int], start: int, expected: list[int], what: str) -> None:
    if ids[start:start + len(expected)] != expected:
        raise PositionError(f"{what} at token {start} does not have the {len(expected)} placeholder tokens its media "
                            "gives: token counts do not match the placeholders")


def qwen2_5_rope_positions(ids: list[int], media: MediaLayout, layout: MropeLayout,
                           use_audio_in_video: bool = False) -> tuple[torch.Tensor, int]:
    """-> (positions (3, len(ids)) long, rope_delta). `media` lists each kind in prompt order; with
    use_audio_in_video every video's sound is the next audio of `media.audio_token_counts`."""
    merge, per_second = layout.spatial_merge_size, layout.position_id_per_seconds
    audios, images, videos = list(media.audio_token_counts), list(media.image_grids), list(media.videos)
    walk, i, text_start = _Walk(), 0, 0

    def take(queue: list, what: str):
        if not queue:
            raise PositionError(f"the prompt has more {what} placeholders than {what} inputs")
        return queue.pop(0)

    while i < len(ids):
        token, following = ids[i], ids[i + 1] if i + 1 < len(ids) else None
        if use_audio_in_video and token == layout.vision_start_token_id and following == layout.audio_start_token_id:
            walk.text(i - text_start)
            walk.shared(2)
            video, count = take(videos, "video"), take(audios, "audio")
            video_pos = vision_positions(video.grid_thw, merge, video.seconds_per_grid, per_second)
            merged, _ = _interleaved(video_pos, torch.arange(count).expand(3, -1), per_second * layout.seconds_per_chunk)
            expected = video_with_audio_tokens(video, count, layout)
            _expect(ids, i + 2, expected + [layout.audio_end_token_id, layout.vision_end_token_id], "the video with audio")
            walk.block(merged)
            walk.shared(2)
            i = text_start = i + 2 + len(expected) + 2
        elif token == layout.audio_start_token_id and following == layout.audio_token_id:
            walk.text(i - text_start + 1)
            count = take(audios, "audio")
            _expect(ids, i + 1, [layout.audio_token_id] * count, "the audio")
            walk.block(torch.arange(count).expand(3, -1))
            i = text_start = i + 1 + count
        elif token == layout.vision_start_token_id and following in (layout.image_token_id, layout.video_token_id):
            walk.text(i - text_start + 1)
            if following == layout.image_token_id:
                grid, seconds = take(images, "image"), 1.0  # one temporal id step per frame group of an image
            else:
                video = take(videos, "video")
                grid, seconds = video.grid_thw, video.seconds_per_grid
            positions = vision_positions(grid, merge, seconds, per_second)
            _expect(ids, i + 1, [following] * positions.shape[1], "the image or video")
            walk.block(positions)
            i = text_start = i + 1 + positions.shape[1]
        else:
            i += 1
    walk.text(len(ids) - text_start)
    leftovers = [name for name, queue in (("audio", audios), ("image", images), ("video", videos)) if queue]
    if leftovers:
        raise PositionError(f"more {' and '.join(leftovers)} inputs than placeholders in the prompt")
    positions = torch.cat(walk.columns, dim=1) if walk.columns else torch.zeros(3, 0, dtype=torch.long)
    return positions, (int(positions.max()) + 1 - len(ids)) if len(ids) else 0
