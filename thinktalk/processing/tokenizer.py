"""Qwen3-Omni text tokenizer: offline conversion of the Qwen BPE ranks, loading, streaming decode.

The Qwen tokenizer is a byte-level BPE (GPT-2 style): text is NFC-normalised, split by a regex into
pre-tokens, each pre-token's UTF-8 bytes are mapped to printable stand-in characters (one char per
byte) and merged by BPE. Special/added tokens are matched atomically before any of that happens.

No hub access is assumed: `build_qwen_tokenizer_files` derives a Hugging Face `tokenizer.json` from the
ranks file shipped inside the PyPI package `dashscope`, and `Tokenizer.from_dir` reads either that file
or a checkpoint's `vocab.json` + `merges.txt`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import importlib.resources
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from .prompt import PromptError

# Qwen2/Qwen3 pre-tokenizer regex: contractions, words with at most one leading non-letter,
# single digits, punctuation runs (with trailing newlines), newline runs, and whitespace runs that
# leave the last space attached to the following word.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Id of QWEN_SPECIAL_TOKENS[0]; the i-th entry has id QWEN_FIRST_SPECIAL_ID + i.
QWEN_FIRST_SPECIAL_ID = 151643

# The 33 added tokens of Qwen3-Omni, in id order 151643..151675. Names and ids 151643..151668 were
# checked against a published Qwen3 tokenizer_config.json. The 7 audio/TTS tokens 151669..151675:
# ids against the Qwen3-Omni config defaults in transformers (audio_start 151669, tts_pad 151671,
# tts_bos 151672, tts_eos 151673), names against published notes on the Omni talker
# (151671..151674) and a later Qwen tokenizer that appends the same 7 names in this same order.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<|audio_pad|>",
)

# In the published Qwen3 tokenizer_config these added tokens carry "special": false: they are still
# matched atomically, but `decode(skip_special_tokens=True)` keeps them (so "<think>" survives).
QWEN_NON_SPECIAL_ADDED: frozenset[str] = frozenset(QWEN_SPECIAL_TOKENS[14:26])

_RANKS_PACKAGE = "dashscope"
_RANKS_RESOURCE = "resources/qwen.tiktoken"
_LOOKED_FOR = ("tokenizer.json", "vocab.json + merges.txt")


def byte_level_alphabet() -> list[str]:
    """Return the 256 stand-in characters of byte-level BPE: `alphabet[b]` represents byte `b`.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0,
    0xAD) are moved, in byte order, to code points 256, 257, ... so every byte is a visible char.
    """
    keeps_itself = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet = []
    shifted = 0
    for byte in range(256):
        if byte in keeps_itself:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def _read_qwen_ranks() -> dict[bytes, int]:
    """Read dashscope's qwen.tiktoken: one `base64(token bytes) rank` pair per line."""
    try:
        resource = importlib.resources.files(_RANKS_PACKAGE).joinpath(_RANKS_RESOURCE)
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"the Qwen BPE ranks ship in the PyPI package {_RANKS_PACKAGE!r}, which is not "
            f"installed; run `pip install {_RANKS_PACKAGE}`"
        ) from exc
    if not resource.is_file():
        raise RuntimeError(f"package {_RANKS_PACKAGE!r} has no {_RANKS_RESOURCE!r}; reinstall it")
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(resource.read_text(encoding="ascii").splitlines(), start=1):
        if not line:
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (IndexError, ValueError, binascii.Error) as exc:
            raise ValueError(f"{_RANKS_RESOURCE} line {line_no} is malformed: {line!r}") from exc
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{_RANKS_RESOURCE}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


def _ranks_to_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into a byte-level BPE vocab (id = rank) and an ordered merge list.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. BPE merges
    the pair with the earliest merge rule. So every split of a token into two existing tokens becomes
    a rule, ordered by the rank of the merged token (ties: ranks of left, then right piece).
    """
    alphabet = byte_level_alphabet()

    def as_chars(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {as_chars(token): rank for token, rank in ranks.items()}
    keyed_merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left_rank = ranks.get(token[:cut])
            right_rank = ranks.get(token[cut:])
            if left_rank is not None and right_rank is not None:
                keyed_merges.append((rank, left_rank, right_rank, token[:cut], token[cut:]))
    keyed_merges.sort()
    merges = [(as_chars(left), as_chars(right)) for _, _, _, left, right in keyed_merges]
    return vocab, merges


def _assemble_backend(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    added: list[tuple[int, str, bool]],
    source: str,
) -> BackendTokenizer:
    """Build the byte-level BPE pipeline shared by every loading path.

    `added` holds (id, content, special) triples; each becomes an atomic added token at that id.
    `source` names where the data came from, for error messages.
    """
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge piece not in vocab
        raise ValueError(f"inconsistent tokenizer files {source}: {exc}") from exc
    backend = BackendTokenizer(bpe)
    backend.normalizer = normalizers.NFC()
    # The regex does the splitting, so ByteLevel only maps bytes to stand-in chars (use_regex=False).
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(
            add_prefix_space=False, trim_offsets=False, use_regex=False
        ),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    for token_id, content, special in sorted(added):
        # Added tokens get the next free id, so they must arrive in id order without gaps.
        expected = backend.get_vocab_size(with_added_tokens=True)
        if vocab.get(content) != token_id and token_id != expected:
            raise ValueError(
                f"{source}: added token {content!r} has id {token_id}, but the next free id is {expected}; "
                "added-token ids must follow the BPE vocabulary without gaps"
            )
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    return backend


def _qwen_added_tokens() -> list[tuple[int, str, bool]]:
    """(id, content, special) for the 33 Qwen3-Omni added tokens."""
    return [
        (QWEN_FIRST_SPECIAL_ID + offset, name, name not in QWEN_NON_SPECIAL_ADDED)
        for offset, name in enumerate(QWEN_SPECIAL_TOKENS)
    ]


def _tokenizer_config(added: list[tuple[int, str, bool]]) -> dict:
    """A Qwen2Tokenizer-style tokenizer_config.json naming the added tokens."""
    decoder = {
        str(token_id): {
            "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": special,
        }
        for token_id, content, special in added
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        # Like Qwen's own config: every special token except the pad/endoftext one.
        "additional_special_tokens": [
            content for _, content, special in added if special and content != "<|endoftext|>"
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 65536,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_qwen_tokenizer_files(out_dir: str | Path) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` for Qwen3-Omni into `out_dir`.

    The BPE comes from dashscope's `qwen.tiktoken` (151,643 ranks); the 33 added tokens follow at
    ids 151643..151675. Output is deterministic. Returns `out_dir` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _ranks_to_vocab_and_merges(_read_qwen_ranks())
    added = _qwen_added_tokens()
    backend = _assemble_backend(vocab, merges, added, source=f"{_RANKS_PACKAGE}/{_RANKS_RESOURCE}")
    backend.save(str(out / "tokenizer.json"), pretty=False)
    config_text = json.dumps(_tokenizer_config(added), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(config_text + "\n", encoding="utf-8")
    return out


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt tokenizer file {path}: {exc}") from exc


def _read_vocab_json(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise ValueError(f"corrupt tokenizer file {path}: expected a JSON object of token -> int id")
    return vocab


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional `#version` header, then one `left right` rule per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"corrupt tokenizer file {path}: {exc}") from exc
    merges = []
    for line_no, line in enumerate(lines, start=1):
        if not line or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"corrupt tokenizer file {path}: line {line_no} is not 'left right': {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_added_tokens(path: Path) -> list[tuple[int, str, bool]]:
    """(id, content, special) from tokenizer_config.json's `added_tokens_decoder`; [] if no file."""
    if not path.is_file():
        return []
    config = _read_json(path)
    entries = config.get("added_tokens_decoder", {}) if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"corrupt tokenizer file {path}: 'added_tokens_decoder' must be an object")
    added = []
    for key, entry in entries.items():
        if not key.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ValueError(f"corrupt tokenizer file {path}: bad added_tokens_decoder entry {key!r}")
        added.append((int(key), entry["content"], bool(entry.get("special", True))))
    return added


class Tokenizer:
    """Text <-> token ids for Qwen3-Omni, backed by the `tokenizers` library."""

    def __init__(self, backend: BackendTokenizer):
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._added = {token_id: token.content for token_id, token in added.items()}
        self._special_ids = frozenset(token_id for token_id, token in added.items() if token.special)
        # Inverse of the byte-level alphabet: stand-in char -> the byte it represents.
        self._char_to_byte = {char: byte for byte, char in enumerate(byte_level_alphabet())}
        # Any added token's text, longest first (so that the longest match wins, as the backend's matcher does).
        names = sorted({content for content in self._added.values() if content}, key=len, reverse=True)
        self._added_text = re.compile("|".join(re.escape(name) for name in names)) if names else None
        self._id_of_added = {content: token_id for token_id, content in self._added.items()}

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json`, or else `vocab.json` + `merges.txt` (+ `tokenizer_config.json`)."""
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        tokenizer_json = directory / "tokenizer.json"
        if tokenizer_json.is_file():
            try:
                backend = BackendTokenizer.from_file(str(tokenizer_json))
            except Exception as exc:  # tokenizers raises a bare Exception on parse errors
                raise ValueError(f"corrupt tokenizer file {tokenizer_json}: {exc}") from exc
            return cls(backend)
        vocab_json, merges_txt = directory / "vocab.json", directory / "merges.txt"
        if not (vocab_json.is_file() and merges_txt.is_file()):
            raise FileNotFoundError(
                f"no tokenizer files in {directory}: looked for {' or '.join(_LOOKED_FOR)}"
            )
        vocab = _read_vocab_json(vocab_json)
        merges = _read_merges_txt(merges_txt)
        added = _read_added_tokens(directory / "tokenizer_config.json")
        source = f"{vocab_json} + {merges_txt} (+ tokenizer_config.json)"
        return cls(_assemble_backend(vocab, merges, added, source=source))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (151676 for Qwen3-Omni)."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special (dropped by `skip_special_tokens`)."""
        return self._special_ids

    @property
    def added_ids(self) -> frozenset[int]:
        """Ids of all added tokens (matched atomically), special or not."""
        return frozenset(self._added)

    @property
    def added_texts(self) -> tuple[str, ...]:
        """The text of every added token (matched atomically by `encode`), longest first."""
        return tuple(sorted({content for content in self._added.values() if content}, key=len, reverse=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in the text are matched atomically."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        check_encodable(text, "text")
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with no added token matched: "<|im_end|>" is the BPE of its 10 characters. The same
        pipeline as `encode` (normaliser, pre-tokeniser, BPE) minus the added-token matcher."""
        check_encodable(text, "text")
        backend = self._backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        words = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        return [token.id for word, _ in words for token in backend.model.tokenize(word)]

    def encode_pieces(self, pieces: Iterable[tuple[str, bool]], split_special: bool = True) -> list[int]:
        """Token ids of a prompt given as (text, trusted) pieces (processing/prompt.py's PromptText).

        Added-token strings in trusted pieces are those tokens. With `split_special`, untrusted pieces are ordinary
        text: the text between two trusted added tokens is encoded as one run, so the ids equal `encode` of the
        joined text whenever no untrusted piece spells an added token and no two pieces join into one at their border
        (the common case takes `encode` itself).
        """
        pieces = list(pieces)
        whole = "".join(text for text, _ in pieces)
        pattern = self._added_text
        if not split_special or pattern is None or self._matches_stay_in_trusted_pieces(pieces, whole):
            return self.encode(whole)
        ids: list[int] = []
        run: list[str] = []  # ordinary text since the last control token
        for text, trusted in pieces:
            if not trusted:
                run.append(text)
                continue
            at = 0
            for match in pattern.finditer(text):
                run.append(text[at:match.start()])
                ids += self.encode_ordinary("".join(run)) if any(run) else []
                ids.append(self._id_of_added[match.group()])
                run, at = [], match.end()
            run.append(text[at:])
        return ids + (self.encode_ordinary("".join(run)) if any(run) else [])

    def _matches_stay_in_trusted_pieces(self, pieces: list[tuple[str, bool]], whole: str) -> bool:
        """The added tokens `encode(whole)` would match are exactly those inside trusted pieces: no untrusted piece
        spells one, and no two neighbouring pieces ("<|im_" + "end|>") join into one across their border."""
        found, at = [], 0
        for text, trusted in pieces:
            if trusted:
                found += [(at + m.start(), at + m.end()) for m in self._added_text.finditer(text)]
            at += len(text)
        return found == [m.span() for m in self._added_text.finditer(whole)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 byte sequences become U+FFFD."""
        checked = [self._check_id(token_id) for token_id in ids]
        return self._backend.decode(checked, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry (byte-level form, e.g. "Ġworld") or of an added token."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"unknown token {token!r}")
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token contributes to decoded text (matches the ByteLevel decoder)."""
        self._check_id(token_id)
        text = self._added.get(token_id)
        if text is None:
            text = self._backend.id_to_token(token_id)
        # The decoder maps a token char by char through the byte alphabet; a token containing any
        # char outside it (only possible for added tokens) contributes its plain UTF-8 instead.
        try:
            return bytes(self._char_to_byte[char] for char in text)
        except KeyError:
            return text.encode("utf-8")

    def _check_id(self, token_id: int) -> int:
        if not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id!r} is outside the vocabulary [0, {self._vocab_size})")
        return token_id


def check_encodable(text: str, what: str) -> None:
    """Text the tokenizer can take: valid Unicode (a lone surrogate, from JSON's "\\ud800", is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PromptError(f"{what}: character {error.start} is a lone surrogate ({text[error.start]!r}), which is "
                          "not valid Unicode text") from None


class IncrementalDetokenizer:
    """Streams text from token ids without ever emitting half of a multi-byte character.

    Each token is turned into its bytes and fed to an incremental UTF-8 decoder, which holds back at
    most the 1-3 bytes of an unfinished character. That is the smallest possible window of recent
    tokens: the work per token is O(token length), independent of how much was decoded before.
    Invalid bytes become U+FFFD exactly where a one-shot decode of the whole sequence puts them, so
    "".join(pushes) + flush() == tokenizer.decode(all_ids, skip_special_tokens).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one id; return the text it completed (may be "" while a character is unfinished)."""
        token_bytes = self._tokenizer.token_bytes(token_id)
        if self._skip_special_tokens and token_id in self._tokenizer.special_ids:
            return ""
        return self._utf8.decode(token_bytes, final=False)

    def flush(self) -> str:
        """End of stream: return held-back bytes (as U+FFFD if incomplete) and reset for reuse."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return tail
