"""Decode speed on the CPU by precision, at the released widths: thinktalk float32 / bfloat16 / int8 / int4 and the
reference (transformers) float32 / bfloat16, side by side in one run, with this machine's bandwidth bound.

    python bench/quant_cpu.py [--layers 4] [--prompt 128] [--new-tokens 32] [--batches 1 4] [--threads 2]

The model is the released thinker's text stack (hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of 768, top 8)
with `--layers` layers and a 16,384-token vocabulary (so that, as in the 48-layer model, the layers and not the
lm_head make most of a step's bytes), random weights drawn in each stored form (thinktalk/random_weights.py). The
reference shares thinktalk's float tensors (tied_reference: no copy). Every figure is the best of RUNS runs;
the machine is shared, so compare ratios.

The bound: a decode step at batch 1 must read the attention matrices, the 8 chosen experts of every layer, the
routers, the lm_head and the KV cache once; this machine's read bandwidth (a torch reduction over 1 GiB, same
threads) divided by those bytes is the most tokens/s any engine could decode.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import full_config_dict  # noqa: E402
from thinker_cpu import BENCH_VOCAB, RUNS, reference_times, thinktalk_times  # noqa: E402

from thinktalk.config import parse_config  # noqa: E402
from thinktalk.omni import Omni  # noqa: E402
from thinktalk.processing.audio import AudioFeatureConfig  # noqa: E402
from thinktalk.processing.multimodal import MediaOptions  # noqa: E402
from thinktalk.processing.vision import VisionProcessorConfig  # noqa: E402
from thinktalk.quant.spec import DEFAULT_QUANTIZED_MODULES, QuantizeOnLoad  # noqa: E402
from thinktalk.random_weights import random_model, tied_reference  # noqa: E402
from decode_bound import decode_step_bytes, read_bandwidth  # noqa: E402

SEED = 0
# The default quantized set keeps the lm_head in bf16 (thinktalk/quant/spec.py); this opt-in row quantizes it too:
# at the released vocabulary it is about 30% of an int4 decode step's bytes, and a bf16 GEMV here runs at ~16 GB/s.
INT4_WITH_LM_HEAD = QuantizeOnLoad("int4", modules=DEFAULT_QUANTIZED_MODULES + (r"thinker\.lm_head",))


def bench_config(layers: int) -> dict:
    """The released config: the thinker's text stack at its widths with `layers` layers and BENCH_VOCAB tokens;
    the encoders (which text decode never runs) at toy widths, thinker only."""
    config = copy.deepcopy(full_config_dict())
    config["enable_audio_output"] = False
    del config["talker_config"], config["code2wav_config"]
    thinker = config["thinker_config"]
    thinker["text_config"].update(num_hidden_layers=layers, vocab_size=BENCH_VOCAB)
    thinker["audio_config"].update(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=1,
                                   downsample_hidden_size=16)
    thinker["vision_config"].update(depth=1, hidden_size=32, intermediate_size=64, num_heads=4,
                                    deepstack_visual_indexes=[0], num_position_embeddings=64)
    return config


def as_omni(config: dict, model) -> Omni:
    return Omni(parse_config(config), model, tokenizer=None, path=Path("."),
                media=MediaOptions(AudioFeatureConfig(), VisionProcessorConfig()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = bench_config(args.layers)
    bandwidth = read_bandwidth()
    print(f"released widths, {args.layers} layers, vocab {BENCH_VOCAB}, {args.threads} threads, prompt "
          f"{args.prompt}, {args.new_tokens} new tokens (greedy), thinktalk eager; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (best of 5 reductions over 1 GiB)")
    print(f"{'batch':>5} | {'engine':22} {'prefill tok/s':>13} {'decode tok/s':>12} {'bound tok/s':>11} "
          f"{'of bound':>8} {'weights':>9}")
    engines = [("thinktalk float32", torch.float32, None, True), ("thinktalk bfloat16", torch.bfloat16, None, True),
               ("thinktalk int8", torch.bfloat16, "int8", False), ("thinktalk int4", torch.bfloat16, "int4", False),
               ("thinktalk int4+lm_head", torch.bfloat16, INT4_WITH_LM_HEAD, False)]
    results: dict[tuple[str, int], float] = {}
    for name, dtype, quantize, with_reference in engines:
        model = random_model(config, "cpu", dtype, SEED, audio_output=False, quantize=quantize)
        omni = as_omni(config, model)
        reference = tied_reference(model, config)[0] if with_reference else None
        weights = sum(p.numel() * p.element_size() for p in model.thinker.model.parameters())
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, BENCH_VOCAB, (batch, args.prompt), generator=gen).tolist()
            max_len = args.prompt + args.new_tokens + 1
            thinktalk_times(omni, prompts, 2, max_len, False)  # warm-up
            runs = [thinktalk_times(omni, prompts, args.new_tokens, max_len, False) for _ in range(RUNS)]
            prefill, decode = min(r[0] for r in runs), min(r[1] for r in runs)
            bound = bandwidth / decode_step_bytes(model.thinker, batch, args.prompt + args.new_tokens // 2)
            rows = [(name, prefill, decode)]
            if reference is not None:
                rows.append((name.replace("thinktalk", "reference"),
                             *reference_times(reference, prompts, args.new_tokens)))
            for label, p, d in rows:
                speed = batch * args.new_tokens / d
                results[(label, batch)] = speed
                print(f"{batch:>5} | {label:22} {batch * args.prompt / p:13.0f} {speed:12.2f} {batch * bound:11.1f} "
                      f"{speed / (batch * bound):8.0%} {weights / 2**30:7.2f}Gi")
        del model, omni, reference
        gc.collect()
    for batch in args.batches:
        bf16 = results[("thinktalk bfloat16", batch)]
        print(f"batch {batch}: int4 / bf16 {results[('thinktalk int4', batch)] / bf16:.2f}x (lm_head too: "
              f"{results[('thinktalk int4+lm_head', batch)] / bf16:.2f}x), int8 / bf16 "
              f"{results[('thinktalk int8', batch)] / bf16:.2f}x, thinktalk bf16 / reference bf16 "
              f"{bf16 / results[('reference bfloat16', batch)]:.2f}x")


if __name__ == "__main__":
    main()
