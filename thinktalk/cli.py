"""The `thinktalk` command line: demo, run, chat, info, serve (and --version).

User mistakes (a bad path, a broken checkpoint, a bad option) print one line `error: ...` and exit 2, without a
traceback. Ctrl-C exits 130 (in `chat` it stops the reply, not the chat: cli_chat.py). One reply's streaming and the
options it takes are in cli_reply.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from importlib import metadata
from pathlib import Path

from .cli_reply import add_generation_options, add_speech_options, check_options, messages_from, stream_reply
from .config import ConfigError
from .errors import RequestError
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


PORT_RANGE = range(0, 2**16)  # TCP ports; 0 lets the system pick a free one


def _port(text: str) -> int:
    """argparse type for --port: an integer in PORT_RANGE (argparse reports anything else as a usage error)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if port not in PORT_RANGE:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-{PORT_RANGE[-1]})")
    return port


def _version() -> str:
    try:
        return f"thinktalk {metadata.version('thinktalk')}"
    except metadata.PackageNotFoundError:
        return "thinktalk (not installed: run `pip install -e .` for its version)"


SERVE_DESCRIPTION = """\
One process serves, on http://HOST:PORT (default 127.0.0.1:8000; https and wss with --ssl-certfile):
  POST /v1/chat/completions, /v1/audio/transcriptions; GET /v1/models, /health   (OpenAI's HTTP API)
  WS   /v1/realtime   OpenAI's Realtime socket: PCM16 24 kHz speech both ways, server VAD, barge-in
  GET  /              a voice and video chat page in the browser
Default model: the built-in random demo checkpoint. Stop with Ctrl-C (requests in flight end cleanly)."""


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_FAMILIES, DEMO_MAX_TOKENS, DEMO_SPEECH_SECONDS

    parser = argparse.ArgumentParser(prog="thinktalk", description="Run Qwen3-Omni (Thinker-Talker) models.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole pipeline (audio + image in, text + speech out) on the "
                                            "built-in random demo checkpoint")
    demo.add_argument("--text", default=None, help="the user's message")
    demo.add_argument("--family", choices=DEMO_FAMILIES, default=DEMO_FAMILIES[0],
                      help="the demo checkpoint's model family: Qwen3-Omni (default) or Qwen2.5-Omni")
    demo.add_argument("--out", default=None, metavar="WAV",
                      help="write the spoken reply to this WAV file (default: none; the speech is made and timed)")
    add_speech_options(demo, max_seconds=DEMO_SPEECH_SECONDS)
    add_generation_options(demo, max_tokens=DEMO_MAX_TOKENS)
    demo.set_defaults(handler=cmd_demo)

    run = commands.add_parser("run", help="answer one message, streaming the text (and speech to --out)")
    _add_model_options(run, required=False)
    _add_input_options(run)
    run.add_argument("--out", default=None, metavar="WAV",
                     help="speak the reply into this WAV file, written as the speech is made")
    add_speech_options(run)
    add_generation_options(run)
    run.set_defaults(handler=cmd_run)

    chat = commands.add_parser("chat", help="talk in the terminal, turn after turn; /image, /audio, /video PATH "
                                            "attach a file to your next message, /help lists the commands, "
                                            "/quit ends; Ctrl-C stops a reply")
    _add_model_options(chat, required=False)
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--out-dir", default=None, metavar="DIR",
                      help="speak each reply into DIR/turn-N.wav (DIR is created when missing)")
    add_speech_options(chat)
    add_generation_options(chat)
    chat.set_defaults(handler=cmd_chat)

    info = commands.add_parser("info", help="describe a checkpoint: variant, sizes, voices, memory needed")
    _add_model_options(info, required=False)
    info.set_defaults(handler=cmd_info)

    serve = commands.add_parser("serve", help="an OpenAI-compatible server: HTTP API, Realtime socket "
                                              "(/v1/realtime) and a chat page (/)", description=SERVE_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(serve, required=False)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: "
                                                          "every interface)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (default: %(default)s)")
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


def _check_model_path(args) -> None:
    """--model names a checkpoint folder (or a cached repo id): a file there is a mistake worth naming."""
    if args.model is not None and Path(args.model).expanduser().is_file():
        raise RequestError(f"--model {args.model}: is a file, not a checkpoint directory (a folder with config.json)")


def _check_voice(args, output: str | None, flag: str) -> None:
    """A voice without a file to speak into would be ignored: refuse it, so the user learns speech needs the file."""
    if args.voice is not None and output is None:
        raise RequestError(f"--voice {args.voice}: speech is written only with {flag}; without it the reply is "
                           "text only")


def _resolve_model(args):
    from .demo import DEMO_NOTICE, ensure_demo_checkpoint

    if args.model is not None:
        _check_model_path(args)
        return args.model
    print(DEMO_NOTICE, file=sys.stderr)
    return ensure_demo_checkpoint()


def cmd_demo(args) -> None:
    """The built-in checkpoint on a tone and an image: text streamed, speech made (and written with --out)."""
    from .demo import DEMO_NOTICE, demo_messages, ensure_demo_checkpoint
    from .omni import Omni
    from .processing.wav import check_writable

    check_options(args)
    if args.out is not None:
        check_writable(args.out)
    if args.threads is None:
        args.threads = 1  # the demo model is tiny: one thread beats several (no OpenMP hand-offs)
    if args.seed is None:
        args.seed = 0  # the same demo every time
    from .demo_qwen2_5 import QWEN2_5_DEMO_NOTICE

    print(DEMO_NOTICE if args.family == "qwen3" else QWEN2_5_DEMO_NOTICE, file=sys.stderr)
    omni = Omni.from_pretrained(ensure_demo_checkpoint(family=args.family), device="cpu", dtype="float32")
    messages = demo_messages(args.text)
    print("user: [a 2-second tone] [a 64x64 noise image] " + messages[-1]["content"][-1]["text"])
    print("assistant: ", end="", flush=True)
    stream_reply(omni, messages, args, args.out, speak=True)


def cmd_run(args) -> None:
    from .omni import Omni
    from .processing.wav import check_writable

    messages = messages_from(args)  # validate before loading anything
    check_options(args)
    _check_voice(args, args.out, "--out FILE")
    if args.out is not None:
        check_writable(args.out)
    omni = Omni.from_pretrained(_resolve_model(args), device=args.device, dtype=args.dtype,
                                audio_output=args.out is not None, quantize=args.quantize)
    stream_reply(omni, messages, args, args.out)


def cmd_chat(args, read=input) -> None:
    """A multi-turn conversation; each reply's text is printed, its speech written to --out-dir/turn-N.wav."""
    from .cli_chat import Chat, chat_loop, prepare_out_dir
    from .omni import Omni

    check_options(args)
    _check_voice(args, args.out_dir, "--out-dir DIR")
    out_dir = prepare_out_dir(args.out_dir)
    omni = Omni.from_pretrained(_resolve_model(args), device=args.device, dtype=args.dtype,
                                audio_output=out_dir is not None, quantize=args.quantize)
    print("[/help lists the commands; Ctrl-C stops a reply; /quit or Ctrl-D leaves]", file=sys.stderr)
    chat_loop(Chat(omni, args, out_dir), read)


def cmd_info(args) -> None:
    from .config import load_config
    from .config_qwen2_5 import MODEL_TYPE as QWEN2_5_MODEL_TYPE, checkpoint_model_type
    from .omni import resolve_checkpoint

    path = resolve_checkpoint(_resolve_model(args))
    if checkpoint_model_type(path) == QWEN2_5_MODEL_TYPE:
        from .qwen2_5_omni import describe_checkpoint

        print("\n".join(describe_checkpoint(path)))
        return
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
    _check_model_path(args)
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
