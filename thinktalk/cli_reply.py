"""One reply in the terminal, shared by `thinktalk demo`, `run` and `chat`: the request from the command line's
options (typed: SamplingParams for the thinker, SpeechParams for the talker), the media paths checked before any
work, and the reply streamed as it is made: text to stdout, speech into a WAV file (processing/wav.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import MediaError, RequestError
from .requests import GenerationRequest, SamplingParams, SpeechParams

# A terminal reply's default length in text tokens: a few paragraphs, read as they stream. The checkpoints' own
# budget (generation_config.json, thousands of tokens) is for batch use and, with random weights, runs for minutes.
TERMINAL_MAX_TOKENS = 512


def add_generation_options(parser: argparse.ArgumentParser, max_tokens: int = TERMINAL_MAX_TOKENS) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help="most reply tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="pick the most likely token at every step")
    parser.add_argument("--seed", type=int, default=None)


def add_speech_options(parser: argparse.ArgumentParser, max_seconds: float | None = None) -> None:
    parser.add_argument("--voice", default=None, help="speaker name, e.g. ethan, chelsie, aiden (case-insensitive)")
    parser.add_argument("--talker-greedy", action="store_true", help="pick the most likely codec code each frame")
    parser.add_argument("--talker-temperature", type=float, default=None)
    parser.add_argument("--talker-top-k", type=int, default=None)
    parser.add_argument("--talker-top-p", type=float, default=None)
    guard = ("at most 1 s per reply token + 5 s (the runaway-speech guard; a real model usually stops sooner), "
             "within the checkpoint's talker budget")
    parser.add_argument("--max-speech-seconds", type=float, default=max_seconds,
                        help=f"stop speaking after this long (default: {'%(default)s' if max_seconds else guard})")


def check_media_path(kind: str, path: str) -> None:
    """A media option's path must be a readable file: say which, and what it is instead."""
    where = Path(path).expanduser()
    if where.is_dir():
        raise MediaError(f"--{kind} {path}: is a directory, not a file")
    if not where.is_file():
        raise MediaError(f"--{kind} {path}: no such file")


def messages_from(args) -> list[dict]:
    """The one user turn (and system prompt) that `run`'s options describe; media paths checked first."""
    media = [(kind, p) for kind in ("audio", "image", "video") for p in getattr(args, kind, [])]
    if (args.text is None or not args.text.strip()) and not media:
        raise RequestError("give a message: --text, or a media file (--audio / --image / --video)")
    for kind, path in media:
        check_media_path(kind, path)
    parts = [{"type": kind, kind: path} for kind, path in media]
    parts += [{"type": "text", "text": args.text}] if args.text else []
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": parts}]


def check_options(args) -> None:
    """Option values that no checkpoint could accept, refused before anything loads."""
    if args.max_tokens < 1:
        raise RequestError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.max_speech_seconds is not None and args.max_speech_seconds <= 0:
        raise RequestError(f"--max-speech-seconds must be positive, got {args.max_speech_seconds}")


def sampling_params(args) -> SamplingParams:
    # --greedy turns sampling off; a sampling option turns it on; neither: the checkpoint's generation_config
    sampled = args.temperature is not None or args.top_k is not None or args.top_p is not None
    do_sample = False if args.greedy else (True if sampled else None)
    return SamplingParams(max_new_tokens=args.max_tokens, do_sample=do_sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def speech_params(args) -> SpeechParams:
    return SpeechParams(voice=args.voice, do_sample=False if args.talker_greedy else None,
                        temperature=args.talker_temperature, top_k=args.talker_top_k, top_p=args.talker_top_p,
                        max_seconds=args.max_speech_seconds)


def stream_reply(omni, messages: list, args, wav_path: str | None, speak: bool | None = None, out=sys.stdout):
    """Streams the reply's text to `out` and its speech into `wav_path` (when given) as they are made; returns the
    GenerationResult. `speak`: make speech even without a file (the demo shows the whole pipeline); default: when
    there is a file. On any exception (Ctrl-C included) the work stops and the WAV file is removed."""
    from .events import AudioChunk, Done, TextDelta
    from .processing.wav import WavWriter

    speak = wav_path is not None if speak is None else speak
    request = GenerationRequest(messages, sampling_params(args), speech_params(args) if speak else None,
                                use_audio_in_video=getattr(args, "use_audio_in_video", False))
    events = omni.stream(request)
    start, first_audio, result = time.perf_counter(), None, None
    writer = WavWriter(wav_path, omni.sample_rate) if wav_path is not None else None
    try:
        for event in events:
            if isinstance(event, TextDelta):
                out.write(event.text)
                out.flush()
            elif isinstance(event, AudioChunk):
                first_audio = first_audio or time.perf_counter() - start
                if writer is not None:
                    writer.write(event.audio)
            elif isinstance(event, Done):
                result = event.result
    except BaseException:
        events.close()
        if writer is not None:
            writer.abort()
        raise
    out.write("\n")
    elapsed = time.perf_counter() - start
    note = f"[{result.usage.completion_tokens} tokens in {elapsed:.2f} s, finish: {result.finish_reason}"
    if speak:
        seconds = result.audio.size / result.sample_rate
        where = f" -> {writer.commit()}" if writer is not None else " (--out FILE writes it)"
        note += f"; {seconds:.2f} s of speech{where}, first audio after {first_audio or elapsed:.2f} s"
    print(note + "]", file=sys.stderr)
    return result
