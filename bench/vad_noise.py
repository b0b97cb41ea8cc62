"""Server VAD on noisy speech: how often Silero VAD and the energy fallback find a spoken turn, by SNR.

Each trial is one utterance (espeak-ng's voice when installed, else a synthetic voiced signal; the output says
which) with 1 s of noise before and 1.5 s after, white + rumble noise at the SNR, fed to the Realtime socket's
InputBuffer in 100 ms appends at the default settings (threshold 0.5, prefix 300 ms, silence 500 ms). A trial
counts as found when there is exactly one turn, starting within 250 ms of the speech and ending before the clip
does. Usage: python bench/vad_noise.py [--trials 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import speech  # noqa: E402

from thinktalk.serve.vad import silero_loader  # noqa: E402

SNRS = (None, 30, 20, 15, 10, 5, 0, -5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if silero_loader() is None:
        sys.exit("silero-vad is not installed (pip install silero-vad)")
    print(f"speech: {speech.source()}; {args.trials} trials per SNR")
    print(f"{'SNR dB':>8} {'silero':>8} {'energy':>8}")
    for snr in SNRS:
        rates = [speech.detection_rate(kind, snr, args.trials) for kind in ("silero", "energy")]
        print(f"{'clean' if snr is None else snr:>8} {rates[0]:>8.2f} {rates[1]:>8.2f}")


if __name__ == "__main__":
    main()
