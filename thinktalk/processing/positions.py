"""TM-RoPE positions: token ids + media metadata -> 3-D (T, H, W) position ids and the decode-time rope delta.

Walking the prompt left to right, with `next` the position after everything placed so far:
  - a text token (and every media start/end marker) takes t = h = w = next;
  - an audio's tokens take consecutive ids from `next` on all three axes (13 ids per second of audio);
  - an image's or video's tokens take t = next + frame * seconds_per_grid * ids_per_second (images: frame 0),
    h = next + row, w = next + column over the merged patch grid;
  - audio inside a video (use_audio_in_video): both start markers take two ids, then the video's and the audio's
    tokens are interleaved in time order (a video token goes first when its t is not larger), each keeping its
    own positions;
  - after a media item, `next` = 1 + the largest id it used on any axis.
Positions are floats: a video sampled at an fps that does not divide evenly gives fractional temporal ids, and
the reference keeps them. `rope_delta` = (largest position + 1) - prompt length: a decode step at cache slot s
sits at position s + rope_delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ThinkerConfig
from ..errors import InputError


@dataclass(frozen=True)
class VideoGrid:
    grid_thw: tuple[int, int, int]  # patches before merging: (frames / temporal_patch, height, width)
    seconds_per_grid: float  # seconds covered by one temporal patch = temporal_patch / sampled fps


@dataclass(frozen=True)
class MediaLayout:
    """What the prompt holds, in prompt order per kind."""

    audio_token_counts: tuple[int, ...] = ()
    image_grids: tuple[tuple[int, int, int], ...] = ()
    videos: tuple[VideoGrid, ...] = ()


class PositionError(InputError):
    """Token ids and media metadata disagree (e.g. more placeholders than media)."""


def _expect_run(ids: list[int], start: int, token: int, count: int, what: str) -> None:
    """The prompt must hold exactly `count` copies of `token` from `start` (one media item's placeholders)."""
    end = start
    while end < len(ids) and ids[end] == token:
        end += 1
    if end - start != count:
        raise PositionError(f"{what} at token {start} has {end - start} placeholder tokens but its media gives "
                            f"{count}: token counts do not match the placeholders")


class _Walker:
    """Accumulates position columns: self.columns is a list of (3, n) float tensors."""

    def __init__(self):
        self.columns: list[torch.Tensor] = []
        self.next = torch.tensor(0.0)

    def text(self, count: int) -> None:
        if count:
            self.columns.append((torch.arange(count, dtype=torch.float32) + self.next).expand(3, -1))
            self.next = self.next + count

    def block(self, positions: torch.Tensor) -> None:
        """Media positions already offset; `next` moves past their largest id."""
        if positions.numel():
            self.columns.append(positions)
            self.next = positions.max() + 1


def vision_positions(grid_thw: tuple[int, int, int], merge: int, seconds_per_grid: float, ids_per_second: int,
                     start: torch.Tensor) -> torch.Tensor:
    """(3, t*h*w/merge^2) positions of one image or video, in the encoder's token order (frame, row, column)."""
    frames, rows, cols = grid_thw[0], grid_thw[1] // merge, grid_thw[2] // merge
    t = torch.arange(frames, dtype=torch.float32) * torch.tensor(seconds_per_grid, dtype=torch.float32)
    t = (t * ids_per_second).view(-1, 1, 1).expand(frames, rows, cols)
    h = torch.arange(rows, dtype=torch.float32).view(1, -1, 1).expand(frames, rows, cols)
    w = torch.arange(cols, dtype=torch.float32).view(1, 1, -1).expand(frames, rows, cols)
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)]) + start


def interleave_by_time(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Merge two (3, n) position runs by temporal id (video first on ties). -> (positions, kinds in order)."""
    order, kinds, v, a = [], [], 0, 0
    while v < video.shape[1] or a < audio.shape[1]:
        take_video = a >= audio.shape[1] or (v < video.shape[1] and video[0, v] <= audio[0, a])
        order.append(video[:, v] if take_video else audio[:, a])
        kinds.append("video" if take_video else "audio")
        v, a = (v + 1, a) if take_video else (v, a + 1)
    return torch.stack(order, dim=1), kinds


def rope_positions(ids: list[int], media: MediaLayout, cfg: ThinkerConfig,
                   use_audio_in_video: bool = False) -> tuple[torch.Tensor, float]:
    """-> (positions (3, len(ids)) float32, rope_delta)."""
    merge, per_second = cfg.vision.spatial_merge_size, cfg.position_id_per_seconds
    audios, images, videos = list(media.audio_token_counts), list(media.image_grids), list(media.videos)
    walk, i, text_start = _Walker(), 0, 0

    def take(queue: list, what: str):
        if not queue:
            raise PositionError(f"the prompt has more {what} placeholders than {what} inputs")
        return queue.pop(0)

    while i < len(ids):
        token, following = ids[i], ids[i + 1] if i + 1 < len(ids) else None
        if token == cfg.vision_start_token_id and following == cfg.audio_start_token_id and use_audio_in_video:
            walk.text(i - text_start + 2)  # text, then both start markers
            video, count = take(videos, "video"), take(audios, "audio")
            video_pos = vision_positions(video.grid_thw, merge, video.seconds_per_grid, per_second, walk.next)
            audio_pos = torch.arange(count, dtype=torch.float32).expand(3, -1) + walk.next
            merged, kinds = interleave_by_time(video_pos, audio_pos)
            expected = [cfg.video_token_id if kind == "video" else cfg.audio_token_id for kind in kinds]
            if ids[i + 2: i + 2 + len(expected)] != expected or ids[i + 2 + len(expected):][:1] != [
                    cfg.audio_end_token_id]:
                raise PositionError(f"the video with audio at token {i} does not interleave its placeholders as "
                                    "its media gives: token counts do not match the placeholders")
            walk.block(merged)
            i += 2 + merged.shape[1]
            text_start = i  # the two end markers are text
        elif token == cfg.audio_start_token_id and following == cfg.audio_token_id:
            walk.text(i - text_start + 1)
            count = take(audios, "audio")
            _expect_run(ids, i + 1, cfg.audio_token_id, count, "the audio")
            walk.block(torch.arange(count, dtype=torch.float32).expand(3, -1) + walk.next)
            i, text_start = i + 1 + count, i + 1 + count
        elif token == cfg.vision_start_token_id and following in (cfg.image_token_id, cfg.video_token_id):
            walk.text(i - text_start + 1)
            if following == cfg.image_token_id:
                grid, seconds = take(images, "image"), 0.0
            else:
                video = take(videos, "video")
                grid, seconds = video.grid_thw, video.seconds_per_grid
            positions = vision_positions(grid, merge, seconds, per_second, walk.next)
            _expect_run(ids, i + 1, following, positions.shape[1], "the image or video")
            walk.block(positions)
            i, text_start = i + 1 + positions.shape[1], i + 1 + positions.shape[1]
        else:
            i += 1
    walk.text(len(ids) - text_start)
    leftovers = [name for name, queue in (("audio", audios), ("image", images), ("video", videos)) if queue]
    if leftovers:
        raise PositionError(f"more {' and '.join(leftovers)} inputs than placeholders in the prompt")
    positions = torch.cat(walk.columns, dim=1) if walk.columns else torch.zeros(3, 0)
    if positions.shape[1] != len(ids):
        raise PositionError(f"media token counts do not match the placeholders ({positions.shape[1]} positions "
                            f"for {len(ids)} tokens)")
    delta = float(positions.max() + 1 - len(ids)) if len(ids) else 0.0
    return positions, delta
