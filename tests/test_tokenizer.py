"""Tests for thinktalk.processing.tokenizer against the real Qwen BPE ranks shipped in dashscope."""

import base64
import importlib.resources
import json
import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer

from thinktalk.processing.tokenizer import (
    QWEN_FIRST_SPECIAL_ID,
    QWEN_NON_SPECIAL_ADDED,
    QWEN_SPECIAL_TOKENS,
    IncrementalDetokenizer,
    Tokenizer,
    build_qwen_tokenizer_files,
    byte_level_alphabet,
)

MIXED_TEXTS = [
    "Hello, world!",
    "你好，世界！今天天气怎么样？",
    "emoji: 😀🦜👨‍👩‍👧‍👦 and flags 🇯🇵 ok",
    "  leading spaces\n\n\ttabs\r\nand CRLF   trailing  ",
    "mixed 中文 English 日本語 한국어 Ελληνικά Русский 123456 3.14159",
    "code: def f(x):\n    return x**2  # it's 'quoted' and \"double\"\n",
    "rare: 𠀀𪚥𰻞 and math 𝔸𝔹 ∑∫√",
    "<|im_start|>user\n你好 😀<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
]


@pytest.fixture(scope="session")
def tok(qwen_dir):
    return Tokenizer.from_dir(qwen_dir)


@pytest.fixture(scope="session")
def qwen_ranks():
    """The raw ranks, read independently of the module under test."""
    resource = importlib.resources.files("dashscope").joinpath("resources/qwen.tiktoken")
    ranks = {}
    for line in resource.read_text(encoding="ascii").splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello, world!", [9707, 11, 1879, 0]),
        ("user", [872]),
        ("assistant", [77091]),
        ("system", [8948]),
        ("\n", [198]),
    ],
)
def test_known_ids(tok, text, ids):
    assert tok.encode(text) == ids


def test_special_token_table():
    assert len(QWEN_SPECIAL_TOKENS) == 33
    assert len(set(QWEN_SPECIAL_TOKENS)) == 33
    by_id = {QWEN_FIRST_SPECIAL_ID + i: name for i, name in enumerate(QWEN_SPECIAL_TOKENS)}
    assert by_id[151643] == "<|endoftext|>"
    assert by_id[151644] == "<|im_start|>"
    assert by_id[151645] == "<|im_end|>"
    assert by_id[151652] == "<|vision_start|>"
    assert by_id[151655] == "<|image_pad|>"
    assert by_id[151656] == "<|video_pad|>"
    assert by_id[151669] == "<|audio_start|>"
    assert by_id[151670] == "<|audio_end|>"
    assert by_id[151671] == "<tts_pad>"
    assert by_id[151672] == "<tts_text_bos>"
    assert by_id[151673] == "<tts_text_eod>"
    assert by_id[151674] == "<tts_text_bos_single>"
    assert by_id[151675] == "<|audio_pad|>"


def test_specials_have_their_ids_and_are_atomic(tok):
    assert tok.vocab_size == 151676
    for offset, name in enumerate(QWEN_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == QWEN_FIRST_SPECIAL_ID + offset
        assert tok.encode(name) == [QWEN_FIRST_SPECIAL_ID + offset]
        # Glued to ordinary text on both sides, the token is still one id.
        ids = tok.encode(f"ab{name}cd")
        assert ids.count(QWEN_FIRST_SPECIAL_ID + offset) == 1
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645
    assert ids[1:3] == [872, 198]
    assert tok.decode(ids[3:-1]) == "hi"
    audio = tok.encode("<|audio_start|><|audio_pad|><|audio_pad|><|audio_end|>")
    assert audio == [151669, 151675, 151675, 151670]


def test_special_flags_follow_the_checkpoint(tok):
    expected_added = set(range(151643, 151676))
    non_special = {tok.token_to_id(name) for name in QWEN_NON_SPECIAL_ADDED}
    assert tok.added_ids == expected_added
    assert tok.special_ids == expected_added - non_special
    assert {151644, 151645, 151669, 151671, 151675} <= tok.special_ids
    assert tok.token_to_id("<think>") not in tok.special_ids
    ids = tok.encode("<|im_start|>assistant\n<think>x</think>y<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>y"


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_text_is_nfc_normalised(tok):
    decomposed = "cafe\u0301 Ame\u0301lie"
    assert tok.encode(decomposed) == tok.encode("café Amélie")
    assert tok.decode(tok.encode(decomposed)) == "café Amélie"


def _rank_merge(piece: bytes, ranks: dict) -> list[int]:
    """tiktoken semantics: repeatedly merge the adjacent pair whose concatenation ranks lowest."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        candidates = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        candidates = [(r, i) for r, i in candidates if r is not None]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def test_merges_reproduce_rank_semantics(tok, qwen_dir, qwen_ranks):
    """The derived merge list must give exactly the ids that merging by rank gives."""
    backend = BackendTokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    char_to_byte = {c: b for b, c in enumerate(byte_level_alphabet())}
    rng = random.Random(0)
    words = " ".join(MIXED_TEXTS[:-1]).split(" ")
    texts = MIXED_TEXTS[:-1] + [" ".join(rng.choices(words, k=40)) for _ in range(20)]
    for text in texts:
        expected = []
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            expected += _rank_merge(bytes(char_to_byte[c] for c in piece), qwen_ranks)
        assert tok.encode(text) == expected, text


def test_alphabet_is_a_bijection():
    alphabet = byte_level_alphabet()
    assert len(set(alphabet)) == 256
    assert alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ"


def _splits_a_character(tok, ids):
    """True if some token of `ids` is not valid UTF-8 by itself (a character spans tokens)."""
    for token_id in ids:
        try:
            tok.token_bytes(token_id).decode("utf-8")
        except UnicodeDecodeError:
            return True
    return False


@pytest.mark.parametrize("text", ["🦜🦩🪿 birds", "𠀀𪚥𰻞 rare CJK", "鿰 and 👨‍👩‍👧‍👦"])
def test_incremental_detokenizer_holds_split_characters(tok, text):
    ids = tok.encode(text)
    assert _splits_a_character(tok, ids), "test text must split a character across tokens"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(token_id) for token_id in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces[:-1]  # a token holding only part of a character yields nothing yet
    assert "".join(pieces) == tok.decode(ids) == text


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_matches_decode_on_chat(tok, skip):
    ids = tok.encode("".join(MIXED_TEXTS) + "<|audio_start|><|audio_pad|><|audio_end|>")
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    text = "".join(detok.push(token_id) for token_id in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_start|>" in text) is not skip


def test_incremental_invalid_bytes_match_decode(tok):
    alphabet = byte_level_alphabet()
    byte_id = {b: tok.token_to_id(alphabet[b]) for b in (0xE4, 0xB8, 0xAD, 0x80, 0xF0)}
    a_id = tok.token_to_id("a")
    cases = [
        [byte_id[0xE4], byte_id[0xB8], byte_id[0xAD]],  # "中" from three byte tokens: valid
        [byte_id[0xE4], a_id],  # lead byte cut off by ASCII
        [byte_id[0x80], a_id],  # stray continuation byte
        [a_id, byte_id[0xF0], byte_id[0xB8]],  # incomplete at the very end
        [byte_id[0xE4], 151645, byte_id[0xB8], byte_id[0xAD]],  # special token inside a char
    ]
    for ids in cases:
        for skip in (False, True):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            text = "".join(detok.push(token_id) for token_id in ids) + detok.flush()
            assert text == tok.decode(ids, skip_special_tokens=skip), (ids, skip)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    pieces = [detok.push(i) for i in cases[-1]] + [detok.flush()]
    assert pieces == ["", "", "", "中", ""]


def test_incremental_matches_decode_on_random_ids(tok):
    rng = random.Random(1234)
    for _ in range(5):
        ids = [rng.randrange(tok.vocab_size) for _ in range(400)]
        ids += [rng.randrange(256) for _ in range(100)]  # byte tokens: likely invalid UTF-8
        rng.shuffle(ids)
        for skip in (False, True):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            text = "".join(detok.push(token_id) for token_id in ids) + detok.flush()
            assert text == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_reusable_after_flush(tok):
    detok = IncrementalDetokenizer(tok)
    first = tok.encode("🦜")
    assert detok.push(first[0]) == ""
    assert detok.flush() == "\ufffd"  # the stream really ended mid-character
    assert "".join(detok.push(i) for i in first) + detok.flush() == "🦜"


def _write_vocab_and_merges(qwen_dir, out_dir):
    """Write the slow-tokenizer file trio from the built tokenizer.json."""
    model = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = (qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(config, encoding="utf-8")


def test_vocab_and_merges_path_matches_tokenizer_json(tok, qwen_dir, tmp_path):
    _write_vocab_and_merges(qwen_dir, tmp_path)
    slow = Tokenizer.from_dir(tmp_path)
    assert slow.vocab_size == tok.vocab_size
    assert slow.special_ids == tok.special_ids
    assert slow.added_ids == tok.added_ids
    for text in MIXED_TEXTS + ["Hello, world!", "<|im_start|>user\nhi<|im_end|>"]:
        ids = slow.encode(text)
        assert ids == tok.encode(text)
        assert slow.decode(ids) == text


def test_transformers_fast_tokenizer_agrees(tok, qwen_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(qwen_dir))
    for text in MIXED_TEXTS + ["Hello, world!", "user", "\n"]:
        ids = reference(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == reference.decode(ids)
        skipped = reference.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=True) == skipped
    assert reference.convert_tokens_to_ids("<|audio_pad|>") == 151675
    assert reference.eos_token == "<|im_end|>"


def test_build_is_deterministic(qwen_dir, tmp_path):
    again = build_qwen_tokenizer_files(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (qwen_dir / name).read_bytes()


def test_missing_files_error_names_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message and "vocab.json" in message and "merges.txt" in message
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")  # merges.txt still missing
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_vocab_merges_and_config(qwen_dir, tmp_path):
    _write_vocab_and_merges(qwen_dir, tmp_path)
    good_vocab = (tmp_path / "vocab.json").read_text(encoding="utf-8")
    (tmp_path / "vocab.json").write_text(good_vocab[:1000], encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('["not", "a", "dict"]', encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text(good_vocab, encoding="utf-8")
    good_merges = (tmp_path / "merges.txt").read_text(encoding="utf-8")
    (tmp_path / "merges.txt").write_text(good_merges + "one two three\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text(good_merges + "Ġzz qq\n", encoding="utf-8")  # not in vocab
    with pytest.raises(ValueError, match="merges.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text(good_merges, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    gap = {"added_tokens_decoder": {"160000": {"content": "<|far|>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(gap), encoding="utf-8")
    with pytest.raises(ValueError, match="160000.*151643"):
        Tokenizer.from_dir(tmp_path)


def test_user_errors(tok):
    with pytest.raises(KeyError, match="no_such_token"):
        tok.token_to_id("<|no_such_token|>")
    with pytest.raises(ValueError, match="151676"):
        tok.decode([1, 151676])
    with pytest.raises(ValueError, match="-1"):
        IncrementalDetokenizer(tok).push(-1)
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"bytes")
