"""Encoding long media on the CPU: 40 minutes of audio and a 60-second video, thinktalk and the reference side by side.

    python bench/perception_cpu.py [--audio-minutes 40] [--video-seconds 60 120] [--reference-audio-minutes 10]
                                   [--tasks audio video]

Each measurement runs in its own process so that its peak resident memory (ru_maxrss) is its own. thinktalk runs
the whole path from samples/frames: log-mel features + audio encoder, frame patches + vision encoder. The
reference runs its feature extractor and its encoders (the video as pre-patched tensors: its video processor needs
torchvision). Machines are noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def build_checkpoint(directory: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from checkpoints import build_reference, save_reference, tiny_config_dict

    from thinktalk.processing.tokenizer import build_qwen_tokenizer_files

    save_reference(build_reference(tiny_config_dict(talker=False)), directory)
    build_qwen_tokenizer_files(directory)


def synthetic_audio(minutes: float):
    import numpy as np

    rate = 16000
    t = np.arange(int(minutes * 60 * rate), dtype=np.float32) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)


def synthetic_frames(seconds: float, fps: float = 2.0, size=(640, 360)):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (int(seconds * fps), size[1], size[0], 3), dtype=np.uint8)


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: peak since start or the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(task: str, engine: str, amount: float, checkpoint: Path) -> dict:
    """Runs in a child process: one task, one engine. Loading and encoding are measured apart: writing 5 to
    /proc/self/clear_refs resets the peak (VmHWM) after loading, so `encode_peak_mib` is encoding's own peak."""
    import torch

    torch.set_num_threads(torch.get_num_threads())
    media = synthetic_audio(amount) if task == "audio" else synthetic_frames(amount)
    with torch.inference_mode():
        encode = (_thinktalk if engine == "thinktalk" else _reference)(task, checkpoint)
        loaded_kib = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        tokens = encode(media)
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loaded_mib": loaded_kib / 1024, "encode_peak_mib": _status_kib("VmHWM") / 1024, "tokens": tokens}


def _thinktalk(task, checkpoint):
    """Loads the model; returns media -> token count, the whole path from samples or frames."""
    from thinktalk import Omni
    from thinktalk.processing.audio import log_mel_features
    from thinktalk.processing.vision import video_patches

    omni = Omni.from_pretrained(checkpoint, device="cpu", dtype="float32", audio_output=False)
    thinker = omni.model.thinker
    if task == "audio":
        return lambda wave: int(thinker.audio_tower([log_mel_features(wave, omni.media.audio)])[0].shape[0])

    def encode_video(frames):
        patches, grid, _ = video_patches(frames, 2.0, omni.media.vision)
        return int(thinker.visual(patches, grid.view(1, 3)).embeds.shape[0])
    return encode_video


def _reference(task, checkpoint):
    """Loads the reference; returns media -> token count (its feature extractor and encoders)."""
    import torch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration, WhisperFeatureExtractor

    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if task == "audio":
        extractor = WhisperFeatureExtractor(feature_size=128)

        def encode_audio(wave):
            features = extractor(wave, sampling_rate=16000, padding=True, truncation=False,
                                 return_attention_mask=True, return_tensors="pt")
            out = model.get_audio_features(features["input_features"], features["attention_mask"], return_dict=True)
            return int(out.last_hidden_state.shape[0])
        return encode_audio
    from thinktalk.processing.vision import VisionProcessorConfig, video_patches

    def encode_video(frames):
        patches, grid, _ = video_patches(frames, 2.0, VisionProcessorConfig())  # the same patches for both engines
        out = model.get_video_features(patches, grid.view(1, 3), return_dict=True)
        return int(sum(p.shape[0] for p in out.pooler_output))
    return encode_video


def run_child(task: str, engine: str, amount: float, checkpoint: Path) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); import perception_cpu as b; "
            "print(json.dumps(b.measure(%r, %r, %r, __import__('pathlib').Path(%r))))"
            % (str(Path(__file__).parent), task, engine, amount, str(checkpoint)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio-minutes", type=float, default=40.0)
    parser.add_argument("--reference-audio-minutes", type=float, default=40.0,
                        help="the reference's audio length (its cost grows faster; 40 minutes may not finish)")
    parser.add_argument("--video-seconds", type=float, nargs="+", default=[60.0])
    parser.add_argument("--tasks", nargs="+", choices=("audio", "video"), default=["audio", "video"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        build_checkpoint(checkpoint)
        rows = []
        if "audio" in args.tasks:
            rows += [("audio", "thinktalk", args.audio_minutes, f"{args.audio_minutes:g} min audio"),
                     ("audio", "reference", args.reference_audio_minutes, f"{args.reference_audio_minutes:g} min audio"),
                     ("audio", "thinktalk", args.reference_audio_minutes, f"{args.reference_audio_minutes:g} min audio")]
        if "video" in args.tasks:
            for seconds in args.video_seconds:
                rows += [("video", engine, seconds, f"{seconds:g} s video, 2 fps") for engine in ("thinktalk", "reference")]
        print("tiny random checkpoint, CPU, float32; each row in its own process; seconds and the encode peak")
        print("cover encoding only (features/patches + encoder), after loading; peak RSS covers the whole process")
        print(f"{'input':22} {'engine':10} {'seconds':>9} {'peak RSS MiB':>13} {'loaded MiB':>11} "
              f"{'encode peak MiB':>16} {'tokens':>8}")
        for task, engine, amount, label in rows:
            r = run_child(task, engine, amount, checkpoint)
            if "error" in r:
                print(f"{label:22} {engine:10} failed: {r['error'][:90]}")
            else:
                print(f"{label:22} {engine:10} {r['seconds']:9.2f} {r['peak_mib']:13.0f} {r['loaded_mib']:11.0f} "
                      f"{r['encode_peak_mib']:16.0f} {r['tokens']:8d}")


if __name__ == "__main__":
    main()
