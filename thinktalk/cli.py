"""The `thinktalk` command line: demo, run, info.

User mistakes (a bad path, a broken checkpoint, a bad option) print one line `error: ...` and exit 2, without a
traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from .config import ConfigError
from .processing.prompt import PromptError
from .weights import CheckpointError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
USER_ERRORS = (ConfigError, CheckpointError, PromptError, FileNotFoundError, NotADirectoryError, ValueError)


def _add_model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help="checkpoint directory or a Hugging Face repo id already in the local cache"
                             + ("" if required else " (default: the built-in demo checkpoint)"))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default=None, help="the user's message")
    parser.add_argument("--system", default=None, help="a system prompt")
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

    demo = commands.add_parser("demo", help="run the whole pipeline on the built-in random demo checkpoint")
    _add_generation_options(demo)
    demo.set_defaults(handler=cmd_demo)

    run = commands.add_parser("run", help="answer one message, streaming the reply")
    _add_model_options(run, required=False)
    _add_generation_options(run)
    run.set_defaults(handler=cmd_run)

    info = commands.add_parser("info", help="describe a checkpoint: variant, sizes, voices, memory needed")
    _add_model_options(info, required=False)
    info.set_defaults(handler=cmd_info)
    return parser


def _messages(args) -> list[dict]:
    if args.text is None or not args.text.strip():
        raise ValueError("--text is required and must not be empty")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": args.text}]


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


def _stream_reply(omni, args, out=sys.stdout) -> None:
    from .omni import Done, TextDelta

    start = time.perf_counter()
    for event in omni.stream_text(_messages(args), seed=args.seed, **_sampling(args)):
        if isinstance(event, TextDelta):
            out.write(event.text)
            out.flush()
        elif isinstance(event, Done):
            usage, elapsed = event.result.usage, time.perf_counter() - start
            out.write("\n")
            print(f"[{usage.completion_tokens} tokens in {elapsed:.2f} s, finish: {event.result.finish_reason}]",
                  file=sys.stderr)


def _resolve_model(args):
    from .demo import DEMO_NOTICE, ensure_demo_checkpoint

    if args.model is not None:
        return args.model
    print(DEMO_NOTICE, file=sys.stderr)
    return ensure_demo_checkpoint()


def cmd_demo(args) -> None:
    from .demo import DEMO_NOTICE, ensure_demo_checkpoint
    from .omni import Omni

    print(DEMO_NOTICE, file=sys.stderr)
    omni = Omni.from_pretrained(ensure_demo_checkpoint(), device="cpu", dtype="float32")
    if args.text is None:
        args.text = "Hello! Please introduce yourself."
    if args.max_tokens is None:
        args.max_tokens = 48
    print(f"user: {args.text}\nassistant: ", end="", flush=True)
    _stream_reply(omni, args)


def cmd_run(args) -> None:
    from .omni import Omni

    _messages(args)  # validate before loading anything
    omni = Omni.from_pretrained(_resolve_model(args), device=args.device, dtype=args.dtype)
    _stream_reply(omni, args)


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
    print(f"parameters:  {parameters:,} ({parameters * 2 / 2**30:.1f} GiB in bfloat16, "
          f"{parameters * 4 / 2**30:.1f} GiB in float32, before KV cache)")


def _parameter_count(cfg) -> int:
    import torch

    from .models.omni import OmniModel

    with torch.device("meta"):
        model = OmniModel(cfg, audio_output=cfg.has_audio_output)
    return sum(math.prod(p.shape) for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
