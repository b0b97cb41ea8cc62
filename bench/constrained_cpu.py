"""What a grammar (response_format json_schema) and logprobs cost per decoded token on the CPU: thinktalk and the
reference (transformers' generate with the same llguidance matcher as a logits processor) side by side.

    python bench/constrained_cpu.py [--tokens 48] [--threads 1]

Builds the test suite's tiny random thinker with the released 152,064-id vocabulary and the real Qwen tokenizer
(so a mask spans the full vocabulary, as in the released model), then times greedy replies of one conversation:
free, with logprobs=5, and constrained by a bounded JSON schema. Prints milliseconds per reply token. The tiny
model's step is cheap, so the per-token overheads show at their largest here; compare differences, not totals.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import build_reference, save_reference, tiny_config_dict  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402

from thinktalk.engine.constraints import build_constraint  # noqa: E402
from thinktalk.omni import Omni  # noqa: E402
from thinktalk.processing.tokenizer import build_qwen_tokenizer_files  # noqa: E402
from thinktalk.requests import ResponseFormat  # noqa: E402

ASK = [{"role": "user", "content": "Weather for the week, as JSON."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit", "note"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "unit": {"enum": ["celsius", "fahrenheit"]},
                         "note": {"type": "string", "maxLength": 40}}}
REPEATS = 3  # timed runs per case (the best one is printed)


class GrammarProcessor(LogitsProcessor):
    """The reference side: the same llguidance matcher masks transformers' scores before its greedy pick."""

    def __init__(self, constraint, prompt_length: int):
        self.constraint, self.prompt_length = constraint, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_length:
            self.constraint.accept(int(input_ids[0, -1]))
        return scores.masked_fill(~self.constraint.allowed(), float("-inf"))


def best_ms_per_token(run) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    for _ in range(REPEATS):
        start = time.perf_counter()
        tokens = run()
        best = min(best, (time.perf_counter() - start) * 1000 / tokens)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)  # the tiny model runs fastest on one
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        reference = build_reference(tiny_config_dict(talker=False), seed=0)
        path = save_reference(reference, Path(folder))
        build_qwen_tokenizer_files(path)
        omni = Omni.from_pretrained(path, device="cpu", dtype="float32")
    ids = torch.tensor([omni.encode_prompt(ASK)])
    stops = frozenset(omni.cfg.stop_token_ids)
    vocab = omni.cfg.thinker.text.vocab_size
    shaped = {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": True}}
    omni.generate(ASK, max_new_tokens=2, response_format=shaped)  # builds the grammar tokenizer once, untimed

    def ours(**options):
        return lambda: len(omni.generate(ASK, max_new_tokens=args.tokens, **options).token_ids)

    def theirs(grammar: bool):
        def run():
            processors = []
            if grammar:
                constraint = build_constraint(omni.tokenizer, vocab, stops, ResponseFormat("json_schema", SCHEMA,
                                                                                           strict=True), None, None)
                processors = [GrammarProcessor(constraint, ids.shape[1])]
            with torch.no_grad():
                out = reference.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                 max_new_tokens=args.tokens, do_sample=False,
                                                 eos_token_id=sorted(stops), logits_processor=processors)
            return out.shape[1] - ids.shape[1]
        return run

    rows = [("free (greedy)", ours(), theirs(False)),
            ("logprobs=5", ours(logprobs=5), None),
            ("json_schema", ours(response_format=shaped), theirs(True))]
    print(f"{'ms per reply token':<20}{'thinktalk':>12}{'tokens':>8}{'reference':>12}{'tokens':>8}")
    for name, mine, reference_run in rows:
        ms, count = best_ms_per_token(mine)
        line = f"{name:<20}{ms:>12.2f}{count:>8}"
        if reference_run is not None:
            ref_ms, ref_count = best_ms_per_token(reference_run)
            line += f"{ref_ms:>12.2f}{ref_count:>8}"
        print(line)


if __name__ == "__main__":
    main()
