"""thinktalk against the reference (transformers) on one model with random weights, side by side, in one run.

    python bench/gpu.py [--config full|tiny|CONFIG.json] [--device cuda|cpu] [--only thinker,talker,code2wav,speech]

Builds thinktalk's OmniModel with strong random weights drawn on the device (thinktalk.random_weights; bf16 on
CUDA) and the reference model on the meta device with every parameter set to thinktalk's tensor: one copy of the
weights serves both (the full model is 70.5 GB; two copies would not fit an 80 GB GPU). Then, each row
thinktalk | reference | ratio (how many times better thinktalk is):

    thinker   prefill tok/s of a 2,500-token prompt; decode tok/s at batch 1, 8, 32 (greedy)
    talker    frames/s: one talker step + one code-predictor pass (15 residual codes) per frame; cold: the first
              frames of a new TalkerSession (its eager warm-up calls and graph captures), steady: later frames of
              that same session
    code2wav  ms per frame: thinktalk streams one frame per call; the reference has only a one-shot decode
    speech    a 5-second audio question, spoken reply: time to the first audio packet (cold = the first request
              after start-up, then 1, 4 and 8 concurrent requests) and real-time factor at 1 and 16 concurrent.
              thinktalk: requests submitted to the Omni's one persistent scheduler (Omni.enable_batching, then
              Omni.submit), which this thread iterates as the server's worker does: concurrent replies share each
              thinker decode step, talker step, code-predictor pass and Code2Wav call. The scheduler is built once;
              each concurrency level runs twice on it: cold (its first run at that level captures the decode
              step of that many rows) and steady (the same scheduler, everything captured).
              The reference has no streaming: its first packet is its whole reply; concurrent requests are one
              batched generate() call (one run per level, beside thinktalk's steady figure).
    memory    peak GPU memory of each engine's sections (both include the shared weights)

Every timed object is warmed untimed first, or its first run is printed apart as a cold figure. Timing brackets
work with torch.cuda.synchronize on CUDA. Every figure is the best of --runs runs, except the speech rows (one run
each). `--config full` is the released config (tests/data/); another config.json can be given as a path.
`--config tiny --device cpu` runs every section in seconds (tests/test_bench_gpu.py runs it). bench/gpu_run.py runs
the same figures as prioritised stages with time limits, for a device run.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (VOICE, Clock, Row, Setup, build, header, memory_row, parser, question,  # noqa: E402
                        random_prompts, resolve)
from test_multimodal_parity import reference_inputs  # noqa: E402  (gpu_common put tests/ on sys.path)
from thinker_cpu import TokenClock  # noqa: E402

from thinktalk.config import SamplingConfig  # noqa: E402
from thinktalk.engine.encoding import PromptEncoding  # noqa: E402
from thinktalk.engine.graphs import WARMUP_CALLS  # noqa: E402
from thinktalk.engine.talker_prompt import TalkerPrefill, build_talker_prefill  # noqa: E402
from thinktalk.engine.talker_session import TalkerSession  # noqa: E402
from thinktalk.engine.thinker_runner import ThinkerRunner, text_prefill_inputs  # noqa: E402
from thinktalk.events import AudioChunk, Done, Event, Failed  # noqa: E402
from thinktalk.layers.sampler import Sampler  # noqa: E402
from thinktalk.models.code2wav import Code2WavStream  # noqa: E402
from thinktalk.processing.tokenizer import build_qwen_tokenizer_files  # noqa: E402

SECTIONS = ("thinker", "talker", "code2wav", "speech")
DECODE_BATCHES = (1, 8, 32)
TTFA_CONCURRENCY, RTF_CONCURRENCY = (1, 4, 8), (1, 16)
SPEECH_LEVELS = tuple(sorted(set(TTFA_CONCURRENCY) | set(RTF_CONCURRENCY)))
COLD_FRAMES = WARMUP_CALLS + 2  # a new session's first frames: its eager warm-up calls, the capture, one replay


# ---------------------------------------------------------------------------------------------------- thinker


def reference_thinker_generate(s: Setup, prompts: list[list[int]], new_tokens: int, streamer=None) -> None:
    ids = torch.tensor(prompts, device=s.omni.device)
    s.reference.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, streamer=streamer)


def prefill_row(s: Setup) -> Row:
    """One runner, warmed by an untimed prefill, then timed prefills of the same prompt into it."""
    thinker, b, vocab = s.omni.model.thinker, s.budgets, s.omni.cfg.thinker.text.vocab_size
    prompt = random_prompts(1, b.prompt, vocab, seed=1)
    runner = ThinkerRunner(thinker, 1, b.prompt + 1, mode=s.mode)
    inputs = text_prefill_inputs(thinker, prompt, s.omni.device)
    with s.clock.engine("thinktalk"):
        runner.prefill(inputs)  # warm-up
    ours = s.clock.best_of(s.runs, "thinktalk", lambda: runner.prefill(inputs))
    with s.clock.engine("reference"):
        reference_thinker_generate(s, prompt, 1)  # warm-up
    theirs = s.clock.best_of(s.runs, "reference", lambda: reference_thinker_generate(s, prompt, 1))
    return Row(f"thinker prefill tok/s ({b.prompt}-token prompt)", b.prompt / ours, b.prompt / theirs, True,
               key="prefill_tok_s")


def decode_row(s: Setup, batch: int, reference: bool = True) -> Row:
    vocab, n = s.omni.cfg.thinker.text.vocab_size, s.budgets.new_tokens
    prompts = random_prompts(batch, s.budgets.decode_prompt, vocab, seed=batch)
    ours = batch * n / ours_decode_seconds(s, prompts)
    theirs = batch * n / reference_decode_seconds(s, prompts) if reference else None
    return Row(f"thinker decode tok/s, batch {batch}", ours, theirs, True, key=f"decode_b{batch}_tok_s")


def ours_decode_seconds(s: Setup, prompts: list[list[int]]) -> float:
    """Seconds for new_tokens greedy decode steps after a prefill. One runner serves the warm-up and the timed runs
    (each prefills it again), so a captured graph or compiled step is built once, untimed."""
    thinker, n = s.omni.model.thinker, s.budgets.new_tokens
    runner = ThinkerRunner(thinker, len(prompts), len(prompts[0]) + n + 1, mode=s.mode)

    def run(steps: int) -> float:
        sampler = Sampler(SamplingConfig(), len(prompts), thinker.cfg.text.vocab_size, s.omni.device)
        tokens = sampler(runner.prefill(text_prefill_inputs(thinker, prompts, s.omni.device))[0])
        start = s.clock.now()
        for _ in range(steps):
            tokens = runner.decode_and_sample(tokens, sampler)
        return s.clock.now() - start

    with s.clock.engine("thinktalk"):
        run(WARMUP_CALLS + 2)  # warm-up: the eager steps, then the capture (GRAPH) or the compile (COMPILED)
        return min(run(n) for _ in range(s.runs))


def reference_decode_seconds(s: Setup, prompts: list[list[int]]) -> float:
    """From its first generated token to its last in a (new_tokens + 1)-token generate: new_tokens decode steps,
    clocked by a streamer (which transformers hands each token after copying it to the host)."""
    n = s.budgets.new_tokens

    def once() -> float:
        clock = TokenClock()
        reference_thinker_generate(s, prompts, n + 1, clock)
        assert len(clock.times) == n + 2, len(clock.times)  # the prompt, then every generated token
        return clock.times[-1] - clock.times[1]

    with s.clock.engine("reference"):
        return min(once() for _ in range(s.runs))


# ----------------------------------------------------------------------------------------------- talker, code2wav


def question_talker_prefill(s: Setup) -> TalkerPrefill:
    """The talker prompt of the audio question, after its encoding and thinker prefill (untimed set-up)."""
    omni, cfg = s.omni, s.omni.cfg
    talker, embed = omni.model.talker, omni.model.thinker.embed
    prompt = omni.prepare(question())
    encoding = PromptEncoding(omni.model.thinker, prompt)
    while encoding.pending:
        encoding.run_one()
    inputs = encoding.inputs(cfg.talker.accept_hidden_layer)
    runner = ThinkerRunner(omni.model.thinker, 1, inputs.embeds.shape[1])
    logits, kept = runner.prefill(inputs)
    first = embed(logits.argmax(-1))[0]
    return build_talker_prefill(talker, cfg, inputs.token_ids[0], inputs.embeds[0], kept[0], prompt.layout,
                                prompt.use_audio_in_video, first, cfg.talker.speaker_id(VOICE), embed)


def talker_frames(s: Setup, session: TalkerSession, pad: torch.Tensor, frames: int) -> tuple[float, int]:
    """(seconds, frames made) for up to `frames` more frames of `session`."""
    made, start = 0, s.clock.now()
    while made < frames and not session.finished:
        _, codec_sum = session.complete()
        session.advance(codec_sum, pad)
        made += 1
    return s.clock.now() - start, made


def ours_talker_rates(s: Setup) -> tuple[float, float]:
    """(cold, steady) frames/s of ONE TalkerSession: cold over its first COLD_FRAMES frames (its eager warm-up
    calls and graph captures included), steady the best of --runs runs of talker_frames later frames."""
    frames = s.budgets.talker_frames
    with s.clock.engine("thinktalk"):
        prefill = question_talker_prefill(s)
        budget = COLD_FRAMES + s.runs * frames + 2
        session = TalkerSession(s.omni.model.talker, s.omni.cfg, prefill, SamplingConfig(max_new_tokens=budget),
                                mode=s.mode)
        pad = prefill.text_embeds[2].unsqueeze(0)
        seconds, made = talker_frames(s, session, pad, COLD_FRAMES)
        cold = made / seconds
        runs = [talker_frames(s, session, pad, frames) for _ in range(s.runs)]
    steady = [made / seconds for seconds, made in runs if made]
    assert steady, "the talker ended during its warm-up frames: no steady frames to time"
    return cold, max(steady)


def reference_talker_rate(s: Setup) -> float:
    """Its talker generate()'s tokens per second, clocked by a streamer, from its second token to its last."""
    def once() -> float:
        clock = TokenClock()
        reference_speak(s, 1, clock)
        generated = clock.times[1:]  # the first put is the (empty) prompt
        return (len(generated) - 1) / (generated[-1] - generated[0])

    with s.clock.engine("reference"):
        return max(once() for _ in range(s.runs))


def talker_rows(s: Setup, reference: bool = True) -> list[Row]:
    cold, steady = ours_talker_rates(s)
    theirs = reference_talker_rate(s) if reference else None
    note = f"(reference: its talker generate() per token, {s.budgets.speech_frames} frames)"
    return [Row(f"talker frames/s, cold (a new session's first {COLD_FRAMES} frames)", cold, None, True,
                "(eager warm-up calls and graph captures included)", key="talker_cold_frames_s"),
            Row("talker frames/s, steady (talker step + code predictor)", steady, theirs, True, note,
                key="talker_steady_frames_s")]


def code2wav_rows(s: Setup) -> list[Row]:
    cfg, frames = s.omni.cfg.code2wav, s.budgets.code2wav_frames
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, frames),
                          generator=torch.Generator().manual_seed(2)).to(s.omni.device)

    def ours():
        stream = Code2WavStream(s.omni.model.code2wav)
        for f in range(frames):
            stream.feed(codes[..., f:f + 1])
        stream.finish()

    def theirs():
        s.reference.code2wav.chunked_decode(codes, 300, 25)

    with s.clock.engine("thinktalk"):
        ours()  # warm-up
    ours_s = s.clock.best_of(s.runs, "thinktalk", ours)
    with s.clock.engine("reference"):
        theirs()  # warm-up
    theirs_s = s.clock.best_of(s.runs, "reference", theirs)
    return [Row("code2wav ms per frame (streaming, 1 frame per call)", 1e3 * ours_s / frames,
                1e3 * theirs_s / frames, False, "(reference: one-shot chunked_decode; it cannot stream)",
                key="code2wav_ms_per_frame")]


# ---------------------------------------------------------------------------------------------------------- speech


@dataclass
class Reply:
    first_audio: float  # seconds from the start to the first audio packet
    total: float  # seconds from the start to the last event
    audio: float  # seconds of audio


class ReplyTimer:
    """A request's event sink: when its first audio packet and its Done came, and how much audio it made."""

    def __init__(self, clock: Clock, start: float):
        self.clock, self.start = clock, start
        self.first: float | None = None
        self.reply: Reply | None = None
        self.error: BaseException | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, AudioChunk) and self.first is None:
            self.first = self.clock.now() - self.start
        elif isinstance(event, Done):
            audio = event.result.audio.size / event.result.sample_rate
            self.reply = Reply(self.first, self.clock.now() - self.start, audio)
        elif isinstance(event, Failed):
            self.error = event.error


def speech_scheduler(s: Setup) -> None:
    """The Omni's persistent scheduler with rows for the highest concurrency, unless it has one already."""
    if s.omni.scheduler is None:
        max_len = len(s.omni.encode_prompt(question())) + s.budgets.speech_tokens + 1
        s.omni.enable_batching(rows=max(SPEECH_LEVELS), max_len=max_len)


def ours_speak(s: Setup, concurrency: int) -> list[Reply]:
    """`concurrency` spoken replies submitted together to the Omni's persistent scheduler, which this thread
    iterates until they are all done (as the server's worker does)."""
    b = s.budgets
    speech_scheduler(s)
    start = s.clock.now()
    timers = [ReplyTimer(s.clock, start) for _ in range(concurrency)]
    for timer in timers:
        request = s.omni.request(question(), return_audio=True, voice=VOICE, max_new_tokens=b.speech_tokens,
                                 do_sample=False, stop_token_ids=[-1], talker_do_sample=False,
                                 talker_max_new_tokens=b.speech_frames + 1)
        s.omni.submit(request, timer)
    while not all(t.reply or t.error for t in timers):
        s.omni.iterate()
    if errors := [t.error for t in timers if t.error is not None]:
        raise errors[0]
    return [t.reply for t in timers]


def reference_speech_inputs(s: Setup, concurrency: int) -> dict:
    inputs = reference_inputs(s.omni.prepare(question()))
    inputs.pop("use_audio_in_video")
    out = {}
    for key, value in inputs.items():
        value = value.expand(concurrency, *value.shape[1:]).contiguous().to(s.omni.device)
        out[key] = value.to(s.omni.dtype) if value.is_floating_point() else value
    return out


def reference_speak(s: Setup, concurrency: int, streamer=None) -> float:
    """Seconds of audio per request of one batched generate() of `concurrency` identical audio questions."""
    b = s.budgets
    _, wavs = s.reference.generate(
        **reference_speech_inputs(s, concurrency), speaker=VOICE, thinker_max_new_tokens=b.speech_tokens,
        thinker_min_new_tokens=b.speech_tokens, thinker_do_sample=False, talker_do_sample=False,
        talker_max_new_tokens=b.speech_frames + 1, talker_use_audio_in_video=False, talker_streamer=streamer)
    samples = wavs.shape[-1] if torch.is_tensor(wavs) else min(w.shape[-1] for w in wavs)
    return samples / s.omni.cfg.code2wav.sample_rate


def reference_replies(s: Setup, concurrency: int) -> tuple[Reply, str]:
    """The reference's batched reply: every request's first (and only) packet comes at the end."""
    run = min(concurrency, s.reference_max_concurrency)
    note = "" if run == concurrency else f"(reference bounded: {run} requests, not {concurrency})"
    with s.clock.engine("reference"):
        start = s.clock.now()
        audio = reference_speak(s, run)
        total = s.clock.now() - start
    return Reply(total, total, audio), note


def cold_first_audio(s: Setup) -> Reply:
    """thinktalk's first request after start-up (nothing warmed): the persistent scheduler's first reply."""
    with s.clock.engine("thinktalk"):
        return ours_speak(s, 1)[0]


def level_rows(s: Setup, n: int, reference: bool = True) -> list[Row]:
    """Concurrency n on the one scheduler: its first run (cold: captures the n-row step) and a second (steady)."""
    with s.clock.engine("thinktalk"):
        cold, steady = ours_speak(s, n), ours_speak(s, n)
    theirs, note = reference_replies(s, n) if reference else (None, "")
    rows = []
    if n in TTFA_CONCURRENCY:
        for label, replies, other in (("cold", cold, None), ("steady", steady, theirs)):
            rows.append(Row(f"first audio s, {n} concurrent (mean), {label}",
                            float(np.mean([r.first_audio for r in replies])),
                            None if other is None else other.first_audio, False, note if other else "",
                            key=f"first_audio_c{n}_{label}_s"))
    if n in RTF_CONCURRENCY:
        for label, replies, other in (("cold", cold, None), ("steady", steady, theirs)):
            rows.append(Row(f"RTF, {n} concurrent (mean), {label}",
                            float(np.mean([r.total / r.audio for r in replies])),
                            None if other is None else other.total / other.audio, False, note if other else "",
                            key=f"rtf_c{n}_{label}"))
    return rows


def speech_rows(s: Setup, cold: tuple[Reply, Reply]) -> list[Row]:
    rows = [Row("first audio s, 5-s audio question, cold (first request)", cold[0].first_audio, cold[1].first_audio,
                False, key="first_audio_cold_s")]
    for n in SPEECH_LEVELS:
        rows += level_rows(s, n)
    return rows


# ------------------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = p.parse_args()
    only = [part for part in args.only.split(",") if part]
    if unknown := sorted(set(only) - set(SECTIONS)):
        p.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    config, budgets = resolve(args)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = args.tokenizer or build_qwen_tokenizer_files(Path(tmp))
        setup, weights = build(args, config, budgets, tokenizer_dir)
        cold = None
        if "speech" in only:  # first, so that nothing is warm yet
            cold = cold_first_audio(setup), reference_replies(setup, 1)[0]
        print("\n".join(header(args, setup, weights)), flush=True)
        sections = {"thinker": lambda s: [prefill_row(s)] + [decode_row(s, b) for b in DECODE_BATCHES],
                    "talker": talker_rows, "code2wav": code2wav_rows, "speech": lambda s: speech_rows(s, cold)}
        for section in only:
            for row in sections[section](setup):
                print(row.line(), flush=True)
    print(memory_row(setup).line())
    if "speech" in only:
        print("note: the reference has no streaming; its first audio packet is its whole reply. Cold rows: "
              "thinktalk's first run of a new object (captures included); steady rows: the same object again.")


if __name__ == "__main__":
    main()
