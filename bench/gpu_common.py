"""What bench/gpu.py and bench/gpu_run.py share: the budgets, the table row, the clock, the built Setup (thinktalk's
model with random weights and the reference tied to its tensors), the audio question, the command-line options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import full_config_dict, tiny_config_dict  # noqa: E402

from thinktalk.config import parse_config  # noqa: E402
from thinktalk.engine.graphs import StepMode, default_mode  # noqa: E402
from thinktalk.omni import Omni  # noqa: E402
from thinktalk.processing.audio import AudioFeatureConfig  # noqa: E402
from thinktalk.processing.multimodal import MediaOptions  # noqa: E402
from thinktalk.processing.tokenizer import Tokenizer  # noqa: E402
from thinktalk.processing.vision import VisionProcessorConfig  # noqa: E402
from thinktalk.random_weights import random_model, tied_reference  # noqa: E402

SEED = 20251122
QUESTION_SECONDS, QUESTION_HZ, SAMPLE_RATE = 5.0, 440.0, 16000
VOICE = "ethan"


@dataclass(frozen=True)
class Budgets:
    prompt: int = 2500  # prefill prompt, tokens
    decode_prompt: int = 128  # prompt before the timed decode steps
    new_tokens: int = 64  # timed decode steps
    talker_frames: int = 50  # timed steady frames per run
    code2wav_frames: int = 100
    speech_tokens: int = 24  # thinker tokens of a spoken reply
    speech_frames: int = 40  # codec frames of a spoken reply (12.5 per second)


FULL = Budgets()
TINY = Budgets(prompt=512, new_tokens=8, talker_frames=8, code2wav_frames=8, speech_tokens=4, speech_frames=4)


@dataclass
class Row:
    label: str
    ours: float | None
    theirs: float | None
    higher_is_better: bool
    note: str = ""
    key: str = ""  # the figure's name in bench/gpu_run.py's RESULT lines

    def line(self) -> str:
        def cell(v):
            return "n/a" if v is None else f"{v:.4g}"

        if self.ours is None or self.theirs is None:
            ratio = "n/a"
        else:
            ratio = f"{(self.ours / self.theirs) if self.higher_is_better else (self.theirs / self.ours):.2f}x"
        return f"{self.label:<58} | {cell(self.ours):>11} | {cell(self.theirs):>11} | {ratio:>8}  {self.note}"


class Clock:
    """Wall time that includes all queued GPU work (torch.cuda.synchronize before reading it on CUDA), and each
    engine's peak GPU memory over the work it was given."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = {"thinktalk": 0, "reference": 0}

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def engine(self, name: str):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            yield
        if self.cuda:
            self.peak[name] = max(self.peak[name], torch.cuda.max_memory_allocated())

    def best_of(self, runs: int, name: str, fn) -> float:
        times = []
        with self.engine(name):
            for _ in range(runs):
                start = self.now()
                fn()
                times.append(self.now() - start)
        return min(times)


@dataclass
class Setup:
    omni: Omni
    reference: torch.nn.Module
    clock: Clock
    budgets: Budgets
    runs: int
    mode: StepMode  # how thinktalk's decode steps run (engine/graphs.py)
    reference_max_concurrency: int

def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).tolist()


def question(text: str = "What do you hear?") -> list[dict]:
    """A 5-second tone with a little noise (so the mel features are not degenerate), then the question."""
    t = np.arange(int(QUESTION_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(SEED).normal(0, 0.05, t.shape)
    wave = (0.4 * np.sin(2 * np.pi * QUESTION_HZ * t) + noise).astype(np.float32)
    return [{"role": "user", "content": [{"type": "audio", "audio": (wave, SAMPLE_RATE)},
                                         {"type": "text", "text": text}]}]


def load_config(name: str) -> tuple[dict, Budgets]:
    if name == "full":
        return full_config_dict(), FULL
    if name == "tiny":
        return tiny_config_dict(), TINY
    return json.loads(Path(name).read_text()), FULL


def build(args, config: dict, budgets: Budgets, tokenizer_dir: Path) -> tuple[Setup, str]:
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    start = time.perf_counter()
    model = random_model(config, device, dtype, SEED)
    reference, report = tied_reference(model, config)
    media = MediaOptions(AudioFeatureConfig(), VisionProcessorConfig())
    omni = Omni(parse_config(config), model, Tokenizer.from_dir(tokenizer_dir), tokenizer_dir, media)
    mode = default_mode(device) if args.step_mode is None else StepMode(args.step_mode)
    setup = Setup(omni, reference, Clock(device), budgets, args.runs, mode, args.reference_max_concurrency)
    return setup, f"{report.summary()}; built in {time.perf_counter() - start:.1f} s"


def header(args, setup: Setup, weights: str) -> list[str]:
    import transformers

    name = torch.cuda.get_device_name() if setup.clock.cuda else "CPU"
    b = setup.budgets
    return [f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; {args.dtype}; "
            f"config {args.config}; thinktalk steps {setup.mode.value}; reference "
            f"attention {setup.reference.config._attn_implementation}, experts "
            f"{setup.reference.config.thinker_config.text_config._experts_implementation}",
            f"command: {shlex.join([sys.executable, *sys.argv])}",
            f"weights: {weights}",
            f"budgets: {dataclasses.asdict(b)}; best of {setup.runs} runs (speech rows: one run); greedy",
            f"{'':58} | {'thinktalk':>11} | {'reference':>11} | {'ratio':>8}  (ratio: times better for thinktalk)"]


def memory_row(s: Setup) -> Row:
    gb = {k: v / 1e9 for k, v in s.clock.peak.items()} if s.clock.cuda else {}
    return Row("peak GPU memory GB", gb.get("thinktalk"), gb.get("reference"), False,
               "(each includes the shared weights)", key="peak_memory_gb")


def parser(description: str) -> argparse.ArgumentParser:
    """The options bench/gpu.py and bench/gpu_run.py share."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="full", help="full, tiny, or a config.json path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--runs", type=int, default=None, help="best of how many runs (default 2; tiny: 1)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a directory with tokenizer.json (default: built from dashscope's Qwen ranks)")
    p.add_argument("--step-mode", choices=[m.value for m in StepMode], default=None,
                   help="how thinktalk's decode steps run (default: graph on CUDA, eager on the CPU)")
    p.add_argument("--reference-max-concurrency", type=int, default=16,
                   help="bound the reference's batched speech requests")
    return p


def resolve(args) -> tuple[dict, Budgets]:
    """Fills the defaults that depend on other options -> (config dict, budgets)."""
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    config, budgets = load_config(args.config)
    args.runs = args.runs or (1 if budgets == TINY else 2)
    return config, budgets
