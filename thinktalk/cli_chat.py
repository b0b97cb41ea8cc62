"""`thinktalk chat`: a conversation in the terminal, turn after turn.

Lines starting with / are commands (CHAT_HELP); anything else is a message to the model, sent with the files
attached since the last one. A turn that fails on the caller's side (a file that does not decode, a prompt past
the context) is reported and dropped, and so is a reply stopped with Ctrl-C: the conversation goes on without it.
Only /quit, /exit or Ctrl-D end the chat.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli_reply import check_media_path, stream_reply
from .errors import InputError, RequestError

CHAT_ATTACH = ("/image", "/audio", "/video")
CHAT_QUIT = ("/quit", "/exit")
CHAT_HELP = """commands:
  /image PATH    attach an image to your next message (also /audio PATH, /video PATH)
  /help          this list
  /quit, /exit   leave (Ctrl-D too)
Ctrl-C stops the reply being written; the chat goes on. Start a message with // to send a line beginning with /."""


def prepare_out_dir(out_dir: str | None) -> Path | None:
    """The folder for each reply's WAV, created (with its parents) when missing."""
    if out_dir is None:
        return None
    folder = Path(out_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise RequestError(f"--out-dir {out_dir}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RequestError(f"--out-dir {out_dir}: cannot create it ({error.strerror})") from error
    return folder


class Chat:
    """The conversation so far (what the model sees), the files waiting for the next message, the reply count."""

    def __init__(self, omni, args, out_dir: Path | None):
        self.omni, self.args, self.out_dir = omni, args, out_dir
        self.history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        self.attachments: list[dict] = []
        self.replies = 0

    def command(self, line: str) -> bool:
        """Runs one /command; False when it ends the chat."""
        name, _, argument = line.partition(" ")
        if name in CHAT_QUIT:
            return False
        if name == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif name in CHAT_ATTACH:
            kind, path = name[1:], argument.strip()
            if not path:
                print(f"error: {name} needs a file: {name} PATH", file=sys.stderr)
                return True
            try:
                check_media_path(kind, path)
            except InputError as error:
                print(f"error: {error}", file=sys.stderr)
                return True
            self.attachments.append({"type": kind, kind: path})
            print(f"[{kind} attached: {path}]", file=sys.stderr)
        else:
            print(f"error: unknown command {name} (/help lists the commands)", file=sys.stderr)
        return True

    def say(self, text: str) -> None:
        """One turn: the message and its attachments, the streamed reply. Kept in the history only if it ended."""
        turn = {"role": "user", "content": self.attachments + [{"type": "text", "text": text}]}
        self.attachments = []
        wav = str(self.out_dir / f"turn-{self.replies + 1}.wav") if self.out_dir is not None else None
        print("assistant: ", end="", flush=True)
        try:
            result = stream_reply(self.omni, self.history + [turn], self.args, wav)
        except KeyboardInterrupt:
            print("\n[reply interrupted; this turn is not kept]", file=sys.stderr)
            return
        except InputError as error:
            print(f"\nerror: {error}\n[this turn is not kept; its attachments are dropped]", file=sys.stderr)
            return
        self.replies += 1
        self.history += [turn, {"role": "assistant", "content": result.text}]


def chat_loop(chat: Chat, read=input) -> None:
    """Reads lines until /quit, /exit or end of input; Ctrl-C at the prompt does not leave."""
    while True:
        try:
            line = read("you: ").strip()
        except EOFError:
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves)", file=sys.stderr)
            continue
        if line.startswith("//"):
            chat.say(line[1:])
        elif line.startswith("/"):
            if not chat.command(line):
                return
        elif line:
            chat.say(line)
