"""Memory for long media: chunked Thinker prefill, grouped encoders and the KV-cache planner.

- A chunked prefill equals the one-pass prefill (itself checked against the reference in test_multimodal_parity /
  test_thinker_parity) for a right-padded batch of multimodal prompts, with chunk boundaries inside the media and
  between a row's last tokens: logits, kept hidden states, every cache slot, then greedy decode steps.
- The vision encoder run in groups of frames, and the audio encoder in groups of windows, equal one pass.
- The memory planner's arithmetic and its errors.
"""

import json

import pytest
import torch
from checkpoints import tiny_config_dict
from media import noise_image, tone, write_video

from thinktalk import Omni
from thinktalk.config import parse_config
from thinktalk.engine import memory
from thinktalk.engine.multimodal_inputs import multimodal_prefill_inputs
from thinktalk.engine.thinker_runner import ThinkerRunner
from thinktalk.layers.encoder_attention import group_by_budget

ATOL = 1e-4  # float32; chunking changes only the order of additions
DECODE_STEPS = 8
KEEP_HIDDEN = 2  # after the second layer: past the first deepstack addition, before the second


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


@pytest.fixture(scope="module")
def batch_inputs(omni, tmp_path_factory):
    clip = write_video(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=2.0, fps=4)
    image_audio = [{"role": "user", "content": [{"type": "image", "image": noise_image(64, 96, seed=1)},
                                                {"type": "audio", "audio": (tone(1.3), 16000)},
                                                {"type": "text", "text": "What do you see and hear?"}]}]
    video = [{"role": "user", "content": [{"type": "video", "video": str(clip)},
                                          {"type": "text", "text": "What happens?"}]}]
    prompts = [omni.prepare(image_audio), omni.prepare(video, use_audio_in_video=True)]
    with torch.inference_mode():
        inputs = multimodal_prefill_inputs(omni.model.thinker, prompts)
    inputs.keep_hidden = KEEP_HIDDEN
    return prompts, inputs


def run(omni, inputs, chunk):
    """-> (prefill logits, kept hidden, runner, greedy tokens of DECODE_STEPS steps)."""
    seq = inputs.embeds.shape[1]
    runner = ThinkerRunner(omni.model.thinker, 2, seq + DECODE_STEPS, prefill_chunk=chunk)
    logits, kept = runner.prefill(inputs)
    tokens, picked = logits.argmax(-1), []
    for _ in range(DECODE_STEPS):
        picked.append(tokens.tolist())
        tokens = runner.decode_step(tokens).argmax(-1)
    return logits, kept, runner, picked


def boundaries_inside(ids: torch.Tensor, chunk: int, token: int) -> bool:
    """Some chunk boundary falls between two tokens equal to `token` (a split inside that medium)."""
    cuts = torch.arange(chunk, ids.numel(), chunk)
    return bool(((ids[cuts - 1] == token) & (ids[cuts] == token)).any())


def test_chunked_prefill_equals_one_pass(omni, batch_inputs):
    prompts, inputs = batch_inputs
    cfg = omni.model.thinker.cfg
    lengths = inputs.lengths.tolist()
    assert inputs.after_layer is not None and lengths[0] != lengths[1]
    short = min(lengths)
    # 7 splits every medium; short - 2 puts the shorter row's last two tokens in the second chunk, its last
    # token's logits come from a later chunk than the first.
    chunks = [7, short - 2]
    ids = inputs.token_ids
    assert boundaries_inside(ids[0], 7, cfg.image_token_id) and boundaries_inside(ids[0], 7, cfg.audio_token_id)
    assert boundaries_inside(ids[1], 7, cfg.video_token_id)
    assert any(boundaries_inside(row, short - 2, cfg.video_token_id) for row in ids)
    with torch.inference_mode():
        expected = run(omni, inputs, None)
        for chunk in chunks:
            logits, kept, runner, picked = run(omni, inputs, chunk)
            torch.testing.assert_close(logits, expected[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(kept, expected[1], atol=ATOL, rtol=0)
            for mine, theirs in zip(runner.cache.k + runner.cache.v, expected[2].cache.k + expected[2].cache.v):
                torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)  # every slot, decode steps included
            assert picked == expected[3]


def test_prefill_chunk_must_be_positive(omni):
    with pytest.raises(ValueError, match="prefill_chunk.*0"):
        ThinkerRunner(omni.model.thinker, 1, 8, prefill_chunk=0)


def random_patches(visual, grids, seed=0):
    cfg = visual.cfg
    numel = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    count = sum(t * h * w for t, h, w in grids)
    return torch.randn(count, numel, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grids", [[(5, 4, 6)], [(1, 8, 4), (1, 2, 2), (3, 4, 4), (1, 6, 10)]],
                         ids=["video", "images and a video"])
def test_vision_encoder_in_frame_groups_equals_one_pass(omni, grids):
    visual = omni.model.thinker.visual
    patches = random_patches(visual, grids)
    grid = torch.tensor(grids)
    with torch.inference_mode():
        whole = visual(patches, grid, group_patches=None)
        for budget in (1, 40):  # one frame per group; several (the 60-patch frame alone)
            sizes = [h * w for t, h, w in grids for _ in range(t)]
            assert len(group_by_budget(sizes, budget)) > 1
            grouped = visual(patches, grid, group_patches=budget)
            torch.testing.assert_close(grouped.embeds, whole.embeds, atol=1e-5, rtol=0)
            for mine, theirs in zip(grouped.deepstack, whole.deepstack, strict=True):
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_audio_encoder_in_window_groups_equals_one_pass(omni):
    audio = omni.model.thinker.audio_tower
    generator = torch.Generator().manual_seed(0)
    # 20 s (two full 104-token windows and a tail) and 3 s; a budget of 150 tokens holds one window at a time
    features = [torch.randn(audio.cfg.num_mel_bins, frames, generator=generator) for frames in (2000, 300)]
    with torch.inference_mode():
        whole = audio(features, group_tokens=None)
        grouped = audio(features, group_tokens=150)
    assert len(group_by_budget(audio.attention_windows([w.shape[0] for w in whole]), 150)) > 2
    for mine, theirs in zip(grouped, whole, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_group_by_budget():
    assert group_by_budget([3, 3, 3, 5, 1], 6) == [[3, 3], [3], [5, 1]]
    assert group_by_budget([9, 2], 4) == [[9], [2]]  # a longer sequence alone
    assert group_by_budget([1, 2], None) == [[1, 2]]


# ---------------------------------------------------------------------------------------------------- the planner

@pytest.fixture(scope="module")
def tiny_cfg():
    return parse_config(json.loads(json.dumps(tiny_config_dict())))


def test_kv_bytes_per_token_by_hand(tiny_cfg):
    # thinker: 3 layers, 2 kv heads, head_dim 16; talker: 2 layers, 2 kv heads, head_dim 16
    assert memory.kv_bytes_per_token(tiny_cfg.thinker.text, 4) == 2 * 3 * 2 * 16 * 4
    assert memory.kv_bytes_per_token(tiny_cfg.talker.text, 2) == 2 * 2 * 2 * 16 * 2
    # embeddings + kept hidden + 2 deepstack levels of width 64, 3 float32 positions, one long id
    assert memory.prompt_state_bytes_per_token(tiny_cfg, 2) == 64 * 2 * 4 + 12 + 8


@pytest.mark.parametrize("batch", [1, 3])
def test_plan_uses_what_is_left_and_no_more(tiny_cfg, batch):
    total, weights = 2**30, 10 * 2**20
    plan = memory.plan_memory(tiny_cfg, torch.float32, weights, total, batch=batch, max_prompt=512)
    per_token = (2 * 3 * 2 * 16 + 2 * 2 * 2 * 16) * 4 + 64 * 4 * 4 + 12 + 8
    assert plan.bytes_per_token == per_token and plan.available_bytes == total - weights
    reserved = plan.headroom_bytes + max(plan.encoder_peak_bytes, plan.prefill_peak_bytes)
    assert 0 < reserved < plan.available_bytes
    assert plan.tokens * per_token + reserved <= plan.available_bytes < (plan.tokens + 1) * per_token + reserved
    assert plan.max_len == plan.tokens // batch
    # free bytes given (CUDA after loading): the weights are not subtracted again; no talker: fewer bytes a slot
    after_load = memory.plan_memory(tiny_cfg, torch.float32, weights, total, free_bytes=total - weights,
                                    batch=batch, max_prompt=512, talker=False)
    assert after_load.available_bytes == plan.available_bytes and after_load.tokens > plan.tokens


def test_plan_peaks_grow_with_their_tunables(tiny_cfg):
    text, vision = tiny_cfg.thinker.text, tiny_cfg.thinker.vision
    assert memory.prefill_chunk_peak_bytes(text, 1, 256, 4096, 2) < memory.prefill_chunk_peak_bytes(text, 1, 4096,
                                                                                                      4096, 2)
    assert memory.vision_group_peak_bytes(vision, 1024, 2) < memory.vision_group_peak_bytes(vision, 4096, 2)


def test_plan_errors_name_the_numbers(tiny_cfg):
    with pytest.raises(ValueError, match=r"weights \(2\.00 GiB.*device \(1\.00 GiB"):
        memory.plan_memory(tiny_cfg, torch.bfloat16, 2 * 2**30, 2**30)
    with pytest.raises(ValueError, match="no room for the KV cache: 0.00 GiB free"):
        memory.plan_memory(tiny_cfg, torch.bfloat16, 2**30, 2**30 + 1000)
    with pytest.raises(ValueError, match="device cpu: give a memory budget"):
        memory.device_memory(torch.device("cpu"))
    assert memory.device_memory(torch.device("cpu"), 123) == (123, None)


def test_rows_that_fit_are_what_the_plan_holds_within_bounds(tiny_cfg):
    plan = memory.plan_memory(tiny_cfg, torch.float32, 10 * 2**20, 2**30, max_prompt=512)
    assert memory.rows_that_fit(plan, plan.tokens // 5, most=32) == 5
    assert memory.rows_that_fit(plan, 2, most=32) == 32  # room for many more: capped
    assert memory.rows_that_fit(plan, plan.tokens + 1, most=32) == 1  # not even one full row: still one


def test_host_memory_reads_this_machine():
    total, available = memory.host_memory()
    assert 0 < available <= total
