"""The `thinktalk` command line: demo, run, info.

User mistakes (a bad path, a broken checkpoint, a bad option) print one line `error: ...` and exit 2, without a
traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .config import ConfigError
from .processing.prompt import PromptError
from .weights import CheckpointError

QUANTIZE_CHOICES = ("int8", "int4", "fp8")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
USER_ERRORS = (ConfigError, CheckpointError, PromptError, FileNotFoundError, NotADirectoryError, ValueError)


def _add_model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help="checkpoint directory or a Hugging Face repo id already in the local cache"
                             + ("" if required else " (default: the built-in demo checkpoint)"))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu (bfloat16 there too with quantized weights)")
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES),
                        help="quantize a float checkpoint as it loads (the thinker's and talker's attention and "
                             "experts; int4: about 20 GiB for the 30B-A3B Instruct model); a checkpoint stored "
                             "quantized (FP8, AWQ/GPTQ compressed-tensors, GPTQ, AutoRound) needs no flag")


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default=None, help="the user's message")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--audio", action="append", default=[], metavar="FILE", help="an audio input (repeatable)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image input (repeatable)")
    parser.add_argument("--video", action="append", default=[], metavar="FILE", help="a video input (repeatable)")
    parser.add_argument("--use-audio-in-video", action="store_true", help="also listen to the videos' sound")


def _add_speech_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--voice", default=None, help="speaker name, e.g. ethan, chelsie, aiden (case-insensitive)")
    parser.add_argument("--talker-greedy", action="store_true", help="pick the most likely codec code each frame")
    parser.add_argument("--talker-temperature", type=float, default=None)
    parser.add_argument("--talker-top-k", type=int, default=None)
    parser.add_argument("--talker-top-p", type=float, default=None)
    parser.add_argument("--max-speech-seconds", type=float, default=None,
                        help="stop speaking after this long (default: the checkpoint's talker budget)")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models)")
    parser.add_argument("--max-tokens", type=int, default=None, help="most reply tokens (default: checkpoint's)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="pick the most likely token at every step")
    parser.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinktalk", description="Run Qwen3-Omni (Thinker-Talker) models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole pipeline (audio + image in, text + speech out) on the "
                                            "built-in random demo checkpoint")
    demo.add_argument("--text", default=None, help="the user's message")
    demo.add_argument("--out", default="demo-reply.wav", help="where the spoken reply goes (default: %(default)s)")
    _add_speech_options(demo)
    _add_generation_options(demo)
    demo.set_defaults(handler=cmd_demo)

    run = commands.add_parser("run", help="answer one message, streaming the text (and speech to --out)")
    _add_model_options(run, required=False)
    _add_input_options(run)
    run.add_argument("--out", default=None, metavar="WAV", help="speak the reply into this WAV file")
    _add_speech_options(run)
    _add_generation_options(run)
    run.set_defaults(handler=cmd_run)

    chat = commands.add_parser("chat", help="talk in the terminal, turn after turn; /image, /audio, /video PATH "
                                            "attach a file to your next message, /quit ends")
    _add_model_options(chat, required=False)
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--out-dir", default=None, help="speak each reply into DIR/turn-N.wav")
    _add_speech_options(chat)
    _add_generation_options(chat)
    chat.set_defaults(handler=cmd_chat)

    info = commands.add_parser("info", help="describe a checkpoint: variant, sizes, voices, memory needed")
    _add_model_options(info, required=False)
    info.set_defaults(handler=cmd_info)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, transcriptions)")
    _add_model_options(serve, required=False)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="default: the checkpoint folder's name")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    serve.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="allow file:// media URLs under DIR")
    serve.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media URLs (public hosts)")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    serve.add_argument("--batch-rows", type=int, default=None, metavar="N",
                       help="concurrent requests sharing one thinker decode step; also how many run at once (default: "
                            "as many rows of --batch-max-len slots as free memory holds, at most 32; 0: every "
                            "request decodes alone, 8 at once)")
    serve.add_argument("--batch-max-len", type=int, default=None, metavar="L",
                       help="prompt + reply tokens per batch row; longer requests get a row of their own "
                            "(default: what the GPU's free memory holds after the weights; 4096 on the CPU)")
    serve.add_argument("--compile", action="store_true", help="compile the shared decode step (torch.compile)")
    serve.add_argument("--prefix-cache-mib", type=int, default=1024, metavar="MIB",
                       help="memory for finished conversations' K/V, so a next turn prefills only its new tokens "
                            "(default: %(default)s; 0: off)")
    serve.add_argument("--max-model-len", type=int, default=None, metavar="N",
                       help="prompt + reply tokens per request; longer ones get 400 (default: the checkpoint's "
                            "max_position_embeddings)")
    serve.add_argument("--ssl-certfile", default=None, metavar="PEM",
                       help="serve https:// and wss:// with this certificate (the Realtime SDKs connect over wss)")
    serve.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the certificate's private key")
    serve.set_defaults(handler=cmd_serve)
    return parser


def _messages(args) -> list[dict]:
    media = [("audio", p) for p in getattr(args, "audio", [])] + [("image", p) for p in getattr(args, "image", [])]
    media += [("video", p) for p in getattr(args, "video", [])]
    if (args.text is None or not args.text.strip()) and not media:
        raise ValueError("give a message: --text, or a media file (--audio / --image / --video)")
    for kind, path in media:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{kind} {path}: no such file")
    parts = [{"type": kind, kind: path} for kind, path in media]
    parts += [{"type": "text", "text": args.text}] if args.text else []
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": parts}]


FRAMES_PER_SECOND = 12.5  # Qwen3-Omni's codec frame rate


def _talker(args) -> dict:
    options = dict(temperature=args.talker_temperature, top_k=args.talker_top_k, top_p=args.talker_top_p)
    if args.max_speech_seconds is not None:
        if args.max_speech_seconds <= 0:
            raise ValueError(f"--max-speech-seconds must be positive, got {args.max_speech_seconds}")
        options["max_new_tokens"] = int(args.max_speech_seconds * FRAMES_PER_SECOND) + 1
    if args.talker_greedy:
        options["do_sample"] = False
    return {k: v for k, v in options.items() if v is not None}


def _sampling(args) -> dict:
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    options = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    if args.greedy:
        options["do_sample"] = False
    elif args.temperature is not None or args.top_k is not None or args.top_p is not None:
        options["do_sample"] = True
    return {k: v for k, v in options.items() if v is not None}


def _reply(omni, messages: list, args, wav_path: str | None, out=sys.stdout):
    """Streams the reply's text to `out` and, with `wav_path`, its speech into that WAV file; returns the result."""
    from .events import Done
    from .events import AudioChunk, TextDelta
    from .processing.wav import WavWriter

    speak = wav_path is not None
    events = omni.stream(messages, return_audio=speak, voice=getattr(args, "voice", None), talker=_talker(args),
                         use_audio_in_video=getattr(args, "use_audio_in_video", False), seed=args.seed,
                         **_sampling(args))
    start, first_audio, result = time.perf_counter(), None, None
    writer = WavWriter(wav_path, omni.cfg.code2wav.sample_rate) if speak else None
    try:
        for event in events:
            if isinstance(event, TextDelta):
                out.write(event.text)
                out.flush()
            elif isinstance(event, AudioChunk):
                first_audio = first_audio or time.perf_counter() - start
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
    if writer is not None:
        path = writer.commit()
        seconds = result.audio.size / result.sample_rate
        note += f"; {seconds:.2f} s of speech -> {path}, first audio after {first_audio or elapsed:.2f} s"
    print(note + "]", file=sys.stderr)
    return result


def _resolve_model(args):
    from .demo import DEMO_NOTICE, ensure_demo_checkpoint

    if args.model is not None:
        return args.model
    print(DEMO_NOTICE, file=sys.stderr)
    return ensure_demo_checkpoint()


def cmd_demo(args) -> None:
    from .demo import DEMO_NOTICE, DEMO_SPEECH_SECONDS, demo_messages, ensure_demo_checkpoint
    from .omni import Omni
    from .processing.wav import check_writable

    check_writable(args.out)
    if args.threads is None:
        args.threads = 1  # the demo model is tiny: one thread beats several (no OpenMP hand-offs)
    if args.max_speech_seconds is None:
        args.max_speech_seconds = DEMO_SPEECH_SECONDS
    if args.seed is None:
        args.seed = 0  # the same demo every time
    print(DEMO_NOTICE, file=sys.stderr)
    omni = Omni.from_pretrained(ensure_demo_checkpoint(), device="cpu", dtype="float32")
    if args.max_tokens is None:
        args.max_tokens = 48
    messages = demo_messages(args.text)
    print("user: [a 2-second tone] [a 64x64 noise image] " + messages[-1]["content"][-1]["text"])
    print("assistant: ", end="", flush=True)
    _reply(omni, messages, args, args.out)


def cmd_run(args) -> None:
    from .omni import Omni
    from .processing.wav import check_writable

    messages = _messages(args)  # validate before loading anything
    if args.out is not None:
        check_writable(args.out)
    omni = Omni.from_pretrained(_resolve_model(args), device=args.device, dtype=args.dtype,
                                audio_output=args.out is not None, quantize=args.quantize)
    _reply(omni, messages, args, args.out)


CHAT_ATTACH = ("/image", "/audio", "/video")


def cmd_chat(args, read=input) -> None:
    """A multi-turn conversation; each reply's text is printed, its speech written to --out-dir/turn-N.wav."""
    from .omni import Omni

    if args.out_dir is not None and not Path(args.out_dir).is_dir():
        raise ValueError(f"--out-dir {args.out_dir}: no such folder")
    omni = Omni.from_pretrained(_resolve_model(args), device=args.device, dtype=args.dtype,
                                audio_output=args.out_dir is not None, quantize=args.quantize)
    history = [{"role": "system", "content": args.system}] if args.system else []
    attachments, turn = [], 0
    while True:
        try:
            line = read("you: ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        command, _, path = line.partition(" ")
        if command in CHAT_ATTACH:
            if not Path(path).is_file():
                print(f"error: {path!r}: no such file", file=sys.stderr)
                continue
            attachments.append({"type": command[1:], command[1:]: path})
            print(f"[{command[1:]} attached: {path}]", file=sys.stderr)
            continue
        if not line:
            continue
        turn += 1
        history.append({"role": "user", "content": attachments + [{"type": "text", "text": line}]})
        attachments = []
        wav = str(Path(args.out_dir) / f"turn-{turn}.wav") if args.out_dir is not None else None
        print("assistant: ", end="", flush=True)
        result = _reply(omni, history, args, wav)
        history.append({"role": "assistant", "content": result.text})


def cmd_info(args) -> None:
    from .config import load_config
    from .omni import resolve_checkpoint

    path = resolve_checkpoint(_resolve_model(args))
    cfg = load_config(path)
    text = cfg.thinker.text
    variant = "Instruct (text and speech out)" if cfg.has_audio_output else "thinker only (text out)"
    print(f"checkpoint:  {path}")
    print(f"variant:     {variant}")
    moe = text.moe
    experts = f", {moe.num_experts} experts (top {moe.top_k})" if moe else ""
    print(f"thinker:     {text.num_layers} layers, hidden {text.hidden_size}{experts}, vocab {text.vocab_size}")
    if cfg.talker is not None:
        print(f"talker:      {cfg.talker.text.num_layers} layers, {cfg.talker.num_code_groups} code groups")
        print(f"voices:      {', '.join(name for name, _ in cfg.talker.speakers)}")
    parameters = _parameter_count(cfg)
    print(f"parameters:  {parameters:,}")
    _print_memory(cfg, path, args.quantize)


def cmd_serve(args) -> None:
    from .serve.app import run_server
    from .serve.schemas import ServerLimits

    if args.batch_rows is not None and args.batch_rows < 0:
        raise ValueError(f"--batch-rows must be >= 0 (0 turns batching off), got {args.batch_rows}")
    max_len = args.batch_max_len  # None: planned from the GPU's free memory (DEFAULT_MAX_LEN on the CPU)
    if max_len is not None and max_len < 2:
        raise ValueError(f"--batch-max-len must be at least 2, got {max_len}")
    if args.prefix_cache_mib < 0:
        raise ValueError(f"--prefix-cache-mib must be >= 0, got {args.prefix_cache_mib}")
    run_server(args.model, args.host, args.port, args.device, args.served_model_name, args.api_key,
               args.allowed_local_media_path, args.allow_remote_media, dtype=args.dtype, batch_rows=args.batch_rows,
               batch_max_len=max_len, compile=args.compile, quantize=args.quantize,
               prefix_cache_bytes=args.prefix_cache_mib * 2**20,
               limits=ServerLimits(max_model_len=args.max_model_len), ssl_certfile=args.ssl_certfile,
               ssl_keyfile=args.ssl_keyfile)


def _print_memory(cfg, path: Path, quantize: str | None) -> None:
    """The weights' memory in each precision (KV cache and activations come on top), the checkpoint's own first."""
    from .quant import quantization_for
    from .quant.sizes import PRECISIONS, model_bytes

    stored = quantization_for(cfg, path / "config.json", quantize)  # validates the checkpoint's quantization_config
    if cfg.quantization is not None:
        print(f"stored as:   {stored.reader.describe()}")
    print("memory:      weights only (KV cache and activations come on top); quantized: the thinker's and "
          "talker's attention and experts, the rest in bfloat16")
    chosen = quantize or ("bfloat16" if cfg.quantization is None else None)
    for precision in PRECISIONS:
        size = model_bytes(cfg, precision)
        mark = "  <- --quantize" if quantize == precision else ("  <- without --quantize" if chosen == precision else "")
        print(f"  {precision:9} {_size(size.total):>10}  (thinker {_size(size.by_part['thinker'])}){mark}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _parameter_count(cfg) -> int:
    import torch

    from .models.omni import OmniModel

    with torch.device("meta"):
        model = OmniModel(cfg, audio_output=cfg.has_audio_output)
    return sum(math.prod(p.shape) for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        args.handler(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
