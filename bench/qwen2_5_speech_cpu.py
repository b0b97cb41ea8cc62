"""Qwen2.5-Omni spoken replies on the CPU: time to the first audio and real-time factor, thinktalk streaming vs the
reference's one-shot generate, side by side in one run.

    python bench/qwen2_5_speech_cpu.py [--thinker-tokens 64] [--speech-seconds 3] [--threads 1] [--runs 3]

One tiny random Qwen2.5-Omni checkpoint (built by the reference, saved with save_pretrained, loaded by thinktalk's
Omni.from_pretrained), greedy thinker and talker, so both make the same words and the same codec tokens. thinktalk
streams (Omni.stream): its first audio leaves once the talker has made Token2Wav's first window of codes (a chunk of
3 DiT blocks and its look-ahead block: 48 codes, 0.96 s of speech), while the text is still being written. The
reference (transformers Qwen2_5OmniForConditionalGeneration.generate, return_audio) does not stream: its first and
only audio is the whole reply, after the thinker, the talker and Token2Wav have each finished. Both stop at the same
codec budget (the reference: talker_max_new_tokens; thinktalk: max_seconds). RTF = generation time / audio length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints_qwen2_5 import (build_reference, pass_talker_mask_, random_voices, save_reference,  # noqa: E402
                                 tiny_config_dict)

from thinktalk import Omni  # noqa: E402
from thinktalk.config_qwen2_5 import SPEECH_SYSTEM_PROMPT  # noqa: E402
from thinktalk.events import AudioChunk  # noqa: E402
from thinktalk.processing.qwen2_5_tokenizer import build_qwen2_5_tokenizer_files  # noqa: E402
from thinktalk.requests import GenerationRequest, SamplingParams, SpeechParams  # noqa: E402

MESSAGES = [{"role": "system", "content": SPEECH_SYSTEM_PROMPT},
            {"role": "user", "content": "Tell me a short story about the sea."}]
CODES_PER_SECOND = 50  # the tiny model's codec rate, as the released one's: 2 mel frames of 240 samples at 24 kHz


def thinktalk_run(omni: Omni, tokens: int, seconds: float) -> tuple[float, float, float]:
    """(seconds to the first AudioChunk, total seconds, seconds of audio)."""
    request = GenerationRequest(MESSAGES, SamplingParams(max_new_tokens=tokens, do_sample=False, seed=0,
                                                         stop_token_ids=(-1,)),
                                SpeechParams(do_sample=False, repetition_penalty=1.0, max_seconds=seconds))
    start, first, samples = time.perf_counter(), None, 0
    for event in omni.stream(request):
        if isinstance(event, AudioChunk):
            first = first if first is not None else time.perf_counter() - start
            samples += event.audio.size
    return first, time.perf_counter() - start, samples / omni.sample_rate


def reference_run(reference, ids: list[int], tokens: int, codes: int) -> tuple[float, float]:
    """(seconds to its only audio = total seconds, seconds of audio)."""
    tensor = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        _, wave = reference.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), speaker="Chelsie",
                                     thinker_max_new_tokens=tokens, thinker_min_new_tokens=tokens,
                                     thinker_do_sample=False, talker_do_sample=False, talker_max_new_tokens=codes,
                                     talker_min_new_tokens=codes, talker_repetition_penalty=1.0)
    return time.perf_counter() - start, wave.numel() / 24000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thinker-tokens", type=int, default=64)
    parser.add_argument("--speech-seconds", type=float, default=3.0, help="the codec budget, 50 codes a second")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest for tiny models (no OpenMP hand-offs)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = tiny_config_dict()
    reference = build_reference(config, seed=0)
    scratch = tempfile.TemporaryDirectory(prefix="qwen2_5_bench_")  # removed when the run ends
    directory = Path(scratch.name) / "ckpt"
    save_reference(reference, directory, random_voices(config, seed=3))
    pass_talker_mask_(reference)  # the reference's own defect (checkpoints_qwen2_5.py): give its talker the mask
    build_qwen2_5_tokenizer_files(directory)
    omni = Omni.from_pretrained(directory, device="cpu", dtype="float32")
    ids = omni.prepare(MESSAGES).token_ids
    codes = round(args.speech_seconds * CODES_PER_SECOND)
    thinktalk_run(omni, 4, 0.2)  # warm-up
    reference_run(reference, ids, 4, 10)
    ours = [thinktalk_run(omni, args.thinker_tokens, args.speech_seconds) for _ in range(args.runs)]
    theirs = [reference_run(reference, ids, args.thinker_tokens, codes) for _ in range(args.runs)]
    first, total = statistics.median(r[0] for r in ours), statistics.median(r[1] for r in ours)
    audio = ours[0][2]
    ref_total, ref_audio = statistics.median(r[0] for r in theirs), theirs[0][1]
    print(f"tiny random Qwen2.5-Omni, CPU float32, {args.threads} thread(s), greedy, {args.thinker_tokens} text "
          f"tokens, {codes} codec tokens; speech: thinktalk {audio:.2f} s, reference {ref_audio:.2f} s; "
          f"median of {args.runs} runs")
    print(f"{'':10} {'first audio s':>14} {'total s':>9} {'RTF':>7}")
    print(f"{'thinktalk':10} {first:14.3f} {total:9.3f} {total / audio:7.3f}")
    print(f"{'reference':10} {ref_total:14.3f} {ref_total:9.3f} {ref_total / ref_audio:7.3f}")
    print(f"{'ratio':10} {ref_total / first:13.1f}x {ref_total / total:8.1f}x")
    scratch.cleanup()


if __name__ == "__main__":
    main()
