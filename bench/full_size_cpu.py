"""The released Qwen3-Omni-30B-A3B-Instruct at full size on this CPU machine, in int4: the first full-size figures.

    python bench/full_size_cpu.py [--threads 2] [--prompt 256] [--new-tokens 16] [--batches 1 4] [--speech]
                                  [--lm-head]

Builds the Instruct thinker from the released config.json (tests/data/) with random int4 weights drawn directly in
their packed form (thinktalk/random_weights.py: never a float copy; the bf16 model would be 66 GiB on a 24 GiB
machine), loads the real Qwen tokenizer (its BPE ranks from the dashscope package), and prints, for a 256-token text
prompt and for a 5-second audio question: prefill tokens/s, decode tokens/s at batch 1 and 4, the peak RSS, and the
bound this machine sets, measured in the same run: read bandwidth / the bytes one decode step must read. With
`--speech` the talker and Code2Wav are built too (int4 attention and experts, the rest bf16: 20.5 GiB in all) and a
spoken reply gives the time to the first audio and the real-time factor.

No reference runs here: transformers needs the float model, which does not fit. Random weights speak nonsense; the
figures are about speed and memory only.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import full_config_dict  # noqa: E402
from decode_bound import copy_bandwidth, decode_step_bytes, read_bandwidth  # noqa: E402

from thinktalk.config import SamplingConfig, parse_config  # noqa: E402
from thinktalk.engine.multimodal_inputs import multimodal_prefill_inputs  # noqa: E402
from thinktalk.layers.sampler import Sampler  # noqa: E402
from thinktalk.engine.thinker_runner import ThinkerRunner  # noqa: E402
from thinktalk.omni import Omni  # noqa: E402
from thinktalk.processing.audio import AudioFeatureConfig  # noqa: E402
from thinktalk.processing.multimodal import MediaOptions  # noqa: E402
from thinktalk.processing.tokenizer import Tokenizer, build_qwen_tokenizer_files  # noqa: E402
from thinktalk.processing.vision import VisionProcessorConfig  # noqa: E402
from thinktalk.quant.spec import DEFAULT_QUANTIZED_MODULES, QuantizeOnLoad  # noqa: E402
from thinktalk.random_weights import random_model  # noqa: E402

SEED = 0
GIB = 2**30
LM_HEAD = r"thinker\.lm_head"  # --lm-head: added to the default quantized modules
PASSAGE = ("The thinker reads the prompt and writes the reply while the talker turns it into speech, frame by "
           "frame, so the first audio arrives long before the text is finished. ")


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def text_messages(omni: Omni, tokens: int) -> list:
    """A user message whose whole prompt (chat layout included) is `tokens` tokens long."""
    words = (PASSAGE * (tokens // 8)).split()
    low, high = 1, len(words)
    while low < high:  # the most words whose prompt fits
        mid = (low + high + 1) // 2
        fits = len(omni.encode_prompt([{"role": "user", "content": " ".join(words[:mid])}])) <= tokens
        low, high = (mid, high) if fits else (low, mid - 1)
    return [{"role": "user", "content": " ".join(words[:low])}]


def audio_messages(seconds: float) -> list:
    t = np.arange(int(seconds * 16000)) / 16000
    wave = (0.4 * np.sin(2 * np.pi * 440 * t) + np.random.default_rng(0).normal(0, 0.05, t.shape)).astype(np.float32)
    return [{"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)},
                                         {"type": "text", "text": "What do you hear?"}]}]


def prefill_and_decode(omni: Omni, messages: list, batch: int, new_tokens: int) -> tuple[float, float, int]:
    """(prefill seconds incl. the encoders, decode seconds for new_tokens steps, prompt tokens) for `batch` copies."""
    thinker = omni.model.thinker
    prompt = omni.prepare(messages)
    runner = ThinkerRunner(thinker, batch, len(prompt.token_ids) + new_tokens + 1)
    sampler = Sampler(SamplingConfig(), batch, thinker.cfg.text.vocab_size, omni.device)
    start = time.perf_counter()
    with torch.inference_mode():
        logits, _ = runner.prefill(multimodal_prefill_inputs(thinker, [prompt] * batch))
        tokens = sampler(logits)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens = runner.decode_and_sample(tokens, sampler)
        tokens.tolist()
    return prefill, time.perf_counter() - start, len(prompt.token_ids)


def speak(omni: Omni, messages: list, frames: int) -> tuple[float, float, float]:
    """(seconds to the first audio, seconds in all, seconds of audio) for one greedy spoken reply."""
    start, first, audio = time.perf_counter(), None, 0
    for event in omni.stream(messages, max_new_tokens=8, do_sample=False, stop_token_ids=[-1],
                             talker_do_sample=False, talker_max_new_tokens=frames + 1):
        if hasattr(event, "audio") and first is None:
            first = time.perf_counter() - start
        if hasattr(event, "audio"):
            audio += event.audio.size
    return first, time.perf_counter() - start, audio / omni.cfg.code2wav.sample_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--audio-seconds", type=float, default=5.0)
    parser.add_argument("--speech", action="store_true", help="also build the talker and Code2Wav (20.5 GiB)")
    parser.add_argument("--frames", type=int, default=25, help="codec frames of the spoken reply (12.5 per second)")
    parser.add_argument("--lm-head", action="store_true",
                        help="quantize the thinker's lm_head too (opt-in; the default keeps it in bf16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    read, copy = read_bandwidth(), copy_bandwidth()
    print(f"CPU, {args.threads} threads; read bandwidth {read / 1e9:.1f} GB/s, copy {copy / 1e9:.1f} GB/s "
          f"(best of 5 over 1 GiB); command: {' '.join([sys.executable, *sys.argv])}")
    config = full_config_dict()
    start = time.perf_counter()
    quantize = QuantizeOnLoad("int4", modules=DEFAULT_QUANTIZED_MODULES + (LM_HEAD,)) if args.lm_head else "int4"
    model = random_model(config, "cpu", torch.bfloat16, SEED, audio_output=args.speech, quantize=quantize)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"built the full-size {'Instruct (thinker + talker + code2wav)' if args.speech else 'thinker'} in int4 "
          f"(attention and experts{', lm_head' if args.lm_head else ''}; the rest bf16): {weights / GIB:.2f} GiB of "
          f"weights in "
          f"{time.perf_counter() - start:.0f} s; peak RSS {peak_rss():.2f} GiB")
    tokenizer_dir = build_qwen_tokenizer_files(Path(tempfile.mkdtemp()) / "qwen")
    omni = Omni(parse_config(config), model, Tokenizer.from_dir(tokenizer_dir), tokenizer_dir,
                MediaOptions(AudioFeatureConfig(), VisionProcessorConfig()))
    prompts = {f"{args.prompt}-token text": text_messages(omni, args.prompt),
               f"{args.audio_seconds:g} s audio question": audio_messages(args.audio_seconds)}
    prefill_and_decode(omni, prompts[f"{args.prompt}-token text"], 1, 2)  # warm-up, untimed
    print(f"{'prompt':24} {'batch':>5} {'tokens':>6} {'prefill s':>9} {'prefill tok/s':>13} {'decode tok/s':>12} "
          f"{'bound tok/s':>11} {'of bound':>8}")
    for name, messages in prompts.items():
        for batch in args.batches:
            prefill, decode, tokens = prefill_and_decode(omni, messages, batch, args.new_tokens)
            speed = batch * args.new_tokens / decode
            bound = batch * read / decode_step_bytes(model.thinker, batch, tokens + args.new_tokens // 2)
            print(f"{name:24} {batch:>5} {tokens:>6} {prefill:9.2f} {batch * tokens / prefill:13.1f} {speed:12.2f} "
                  f"{bound:11.2f} {speed / bound:8.0%}", flush=True)
    if args.speech:
        first, total, seconds = speak(omni, prompts[f"{args.audio_seconds:g} s audio question"], args.frames)
        print(f"spoken reply to the audio question: first audio after {first:.2f} s, {seconds:.2f} s of audio in "
              f"{total:.2f} s (real-time factor {total / seconds:.2f})")
    print(f"peak RSS {peak_rss():.2f} GiB (machine: {Path('/proc/meminfo').read_text().split()[1]} kB)")


if __name__ == "__main__":
    main()
