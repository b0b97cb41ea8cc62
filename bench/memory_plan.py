"""A COMPUTED memory plan (not a measurement): the full Instruct model with a 120-second video on one GPU.

    python bench/memory_plan.py [--seconds 120] [--width 1920 --height 1080] [--device-gib 80] [--reserved-gib 1.5]
                                [--precision bfloat16|fp8|int8|int4]
    python bench/memory_plan.py --table         # every precision on 24, 48 and 80 GiB devices: what fits

The prompt is counted the way thinktalk.processing counts it: frames sampled at 2 fps, each resized under the
video pixel budget, one token per 32x32 pixels per pair of frames, the sound track's tokens interleaved by time
between <|audio_start|> and <|audio_end|> (use_audio_in_video), plus a short chat template. The weights' bytes are
counted from the model built on the meta device. Everything else comes from thinktalk.engine.memory's estimates;
`--reserved-gib` stands for what the CUDA context, cuBLAS workspaces and the allocator take before the model
(an assumption: nothing here is measured on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import FULL_CONFIG  # noqa: E402

from thinktalk.config import parse_config  # noqa: E402
from thinktalk.engine import memory  # noqa: E402
from thinktalk.engine.thinker_runner import PREFILL_CHUNK  # noqa: E402
from thinktalk.shapes import audio_token_count  # noqa: E402
from thinktalk.models.vision_encoder import GROUP_PATCHES  # noqa: E402
from thinktalk.processing.audio import AudioFeatureConfig  # noqa: E402
from thinktalk.processing.vision import (VisionProcessorConfig, sample_count, smart_resize,  # noqa: E402
                                         video_frame_max_pixels)
from thinktalk.quant.sizes import PRECISIONS, model_bytes  # noqa: E402

NATIVE_FPS = 30.0  # a typical camera rate; the sampler keeps 2 per second whatever it is
TEMPLATE_TOKENS = 32  # <|im_start|>user ... <|im_end|> <|im_start|>assistant, a short question, the vision markers


def video_prompt_tokens(cfg, seconds: float, width: int, height: int) -> dict[str, int]:
    vision = VisionProcessorConfig()
    frames = sample_count(round(seconds * NATIVE_FPS), NATIVE_FPS, vision)
    h, w = smart_resize(height, width, vision.factor, vision.video_min_pixels,
                        video_frame_max_pixels(frames, vision), vision.max_aspect_ratio)
    groups = -(-frames // vision.temporal_patch_size)
    patches_per_frame = (h // vision.patch_size) * (w // vision.patch_size)
    video = groups * patches_per_frame // vision.merge_size ** 2
    mel_frames = round(seconds * AudioFeatureConfig().sampling_rate) // AudioFeatureConfig().hop_length
    audio = audio_token_count(mel_frames, cfg.thinker.audio.n_window)
    return {"sampled frames": frames, "frame height": h, "frame width": w, "vision patches": groups *
            patches_per_frame, "video tokens": video, "audio tokens": audio,
            "prompt tokens": video + audio + 2 + TEMPLATE_TOKENS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--device-gib", type=float, default=80.0)
    parser.add_argument("--reserved-gib", type=float, default=1.5)
    parser.add_argument("--reply-tokens", type=int, default=1024)
    parser.add_argument("--precision", choices=PRECISIONS, default="bfloat16",
                        help="the weights' precision (quantized: attention and experts; the rest bf16)")
    parser.add_argument("--table", action="store_true", help="every precision on 24, 48 and 80 GiB devices")
    args = parser.parse_args()
    cfg = parse_config(json.loads(FULL_CONFIG.read_text()), FULL_CONFIG)
    if args.table:
        return table(cfg, args)
    weights = model_bytes(cfg, args.precision).total
    prompt = video_prompt_tokens(cfg, args.seconds, args.width, args.height)
    total = int((args.device_gib - args.reserved_gib) * memory.GIB)
    plan = memory.plan_memory(cfg, torch.bfloat16, weights, total, max_prompt=prompt["prompt tokens"])
    needed = prompt["prompt tokens"] + args.reply_tokens
    print(f"COMPUTED PLAN, NOT A MEASUREMENT: Qwen3-Omni-30B-A3B-Instruct (thinker + talker + code2wav), "
          f"{args.precision} weights, bf16 compute and KV cache")
    print(f"device {args.device_gib:g} GiB, of which {args.reserved_gib:g} GiB assumed taken before the model")
    print(f"input: {args.seconds:g} s video {args.width}x{args.height} with its sound track")
    for name, value in prompt.items():
        print(f"  {name:26} {value:8d}")
    print(f"  {'weights':26} {weights / memory.GIB:8.2f} GiB ({weights / 1e9:.1f} GB)")
    print(f"tunables: prefill chunk {PREFILL_CHUNK} positions, vision group {GROUP_PATCHES} patches")
    print(plan.describe())
    kv = memory.kv_bytes_per_token(cfg.thinker.text, 2)
    print(f"thinker KV for prompt + {args.reply_tokens} reply tokens: {needed} x {kv} bytes = "
          f"{needed * kv / memory.GIB:.2f} GiB")
    verdict = "fits" if plan.max_len >= needed else "does NOT fit"
    print(f"needed {needed} slots, plan gives {plan.max_len}: {verdict} (margin {plan.max_len - needed} slots)")


def slots(cfg, weights: int, total: int, prompt: int) -> int:
    """Cache slots a plan leaves one request whose chunks attend `prompt` slots (0 when nothing fits)."""
    try:
        return memory.plan_memory(cfg, torch.bfloat16, weights, total, max_prompt=prompt).max_len
    except ValueError:
        return 0


def table(cfg, args) -> None:
    """Cache slots left for one request, per precision and device size, and the longest video that fits (tried in
    10-second steps up to 20 minutes, the audio limit; '+': even the longest)."""
    print("COMPUTED PLAN, NOT A MEASUREMENT: Qwen3-Omni-30B-A3B-Instruct, bf16 compute and KV cache, "
          f"{args.reserved_gib:g} GiB taken before the model, {args.width}x{args.height} video with its sound, "
          f"{args.reply_tokens}-token reply")
    print(f"{'weights':9} {'GiB':>6} | " + " | ".join(f"{d:>3} GiB device: slots, longest video" for d in (24, 48, 80)))
    videos = {s: video_prompt_tokens(cfg, s, args.width, args.height)["prompt tokens"] for s in range(10, 1201, 10)}
    for precision in PRECISIONS:
        weights = model_bytes(cfg, precision).total
        cells = []
        for device in (24, 48, 80):
            total = int((device - args.reserved_gib) * memory.GIB)
            longest = max((s for s, p in videos.items() if p + args.reply_tokens <= slots(cfg, weights, total, p)),
                          default=0)
            free = slots(cfg, weights, total, 8192)
            cells.append(f"{free:>9} slots, {longest:>4} s{'+' if longest == max(videos) else ' '}" if free
                         else f"{'does not fit':>24}")
        print(f"{precision:9} {weights / memory.GIB:6.2f} | " + " | ".join(f"{c:>33}" for c in cells))


if __name__ == "__main__":
    main()
