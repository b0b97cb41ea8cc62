"""Qwen2.5-Omni configs and voices: what is parsed, and errors that name the file and the dotted field."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from checkpoints_qwen2_5 import random_voices, tiny_config_dict

from thinktalk.config_qwen2_5 import load_qwen2_5_config, parse_qwen2_5_config
from thinktalk.config_reader import ConfigError
from thinktalk.models.qwen2_5.voices import SPEAKER_FILE, VoiceError, load_voices


def parse(config: dict, **kwargs):
    return parse_qwen2_5_config(config, "ckpt/config.json", **kwargs)


def test_tiny_config_is_parsed_into_typed_sections():
    cfg = parse(tiny_config_dict())
    text = cfg.thinker.text
    assert (text.hidden_size, text.num_layers, text.head_dim, text.vocab_size) == (64, 3, 16, 152064)
    assert text.qk_norm is False and text.qkv_bias is True and text.attention_bias is False
    assert text.rope.mrope_section == (2, 3, 3) and text.rope.mrope_interleaved is False
    assert cfg.thinker.layout.position_id_per_seconds == 25 and cfg.thinker.layout.audio_token_id == 151646
    assert cfg.thinker.vision.window_tokens == 4 and cfg.thinker.vision.fullatt_block_indexes == (1, 3)
    assert cfg.talker.embedding_size == 64 and cfg.talker.stop_ids == (8292, 8294)
    assert (cfg.talker.codec_bos_id, cfg.talker.codec_mask_id, cfg.talker.text_pad_id) == (8293, 8296, 151859)
    assert cfg.token2wav.dit.look_backward_layers == (0, 2) and cfg.token2wav.bigvgan.samples_per_frame == 240
    assert (cfg.token2wav.num_steps, cfg.token2wav.guidance_scale, cfg.token2wav.sway_coefficient) == (10, 0.5, -1.0)
    assert cfg.has_audio_output and cfg.stop_token_ids == (151645,)


def test_transformers_4_rope_spelling_parses_the_same():
    new = tiny_config_dict()
    old = copy.deepcopy(new)
    for decoder in (old["thinker_config"]["text_config"], old["talker_config"]):
        params = decoder.pop("rope_parameters")
        decoder["rope_theta"] = params["rope_theta"]
        decoder["rope_scaling"] = {"type": "default", "mrope_section": params["mrope_section"]}
    assert parse(old) == parse(new)


@pytest.mark.parametrize("change", ["disabled", "no talker section"])
def test_thinker_only_configs(change):
    config = tiny_config_dict()
    if change == "disabled":
        config["enable_audio_output"] = False
    else:
        del config["talker_config"], config["token2wav_config"]
    cfg = parse(config)
    assert cfg.talker is None and cfg.token2wav is None and not cfg.has_audio_output


def test_generation_config_sets_sampling_and_stop_ids():
    cfg = parse(tiny_config_dict(), generation={"eos_token_id": [151643, 151645], "talker_top_k": 7})
    assert cfg.stop_token_ids == (151645, 151643) and cfg.talker_sampling.top_k == 7
    assert cfg.talker_sampling.top_p == 0.8  # the rest keep the reference's talker defaults


def edit(path: str, value):
    config = tiny_config_dict()
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return config


@pytest.mark.parametrize("path, value, message", [
    ("model_type", "qwen3_omni_moe", "ckpt/config.json: model_type must be 'qwen2_5_omni'"),
    ("code2wav_config", {"hidden_size": 8}, "ckpt/config.json: code2wav_config is Qwen3-Omni's vocoder section"),
    ("thinker_config.text_config.rope_parameters.mrope_section", [2, 3, 4],
     "thinker_config.text_config.rope_parameters.mrope_section must be 3 counts summing to head_dim/2=8"),
    ("thinker_config.text_config.use_sliding_window", True, "thinker_config.text_config.use_sliding_window is true"),
    ("thinker_config.vision_config.window_size", 100, "thinker_config.vision_config.window_size (100) must be a "
                                                      "multiple of patch_size * spatial_merge_size (28)"),
    ("thinker_config.vision_config.fullatt_block_indexes", [4], "fullatt_block_indexes must lie in [0, depth=4)"),
    ("thinker_config.audio_config.output_dim", 32, "thinker_config.audio_config.output_dim (32) must equal "
                                                   "text_config.hidden_size (64)"),
    ("talker_config.embedding_size", 48, "talker_config.embedding_size (48) must equal the thinker's hidden_size"),
    ("talker_config.tts_codec_end_token_id", 9000, "talker_config.tts_codec_end_token_id (9000) must lie in the "
                                                   "codec vocabulary [0, 8448)"),
    ("talker_config.num_attention_heads", None, "talker_config.num_attention_heads is required but missing"),
    ("token2wav_config.dit_config.look_ahead_layers", [9], "token2wav_config.dit_config.look_ahead_layers must lie"),
    ("token2wav_config.bigvgan_config.upsample_kernel_sizes", [11, 7, 4, 4, 4, 5],
     "token2wav_config.bigvgan_config.upsample_kernel_sizes each kernel minus its rate must be even"),
    ("token2wav_config.bigvgan_config.mel_dim", 100, "token2wav_config.bigvgan_config.mel_dim (100) must equal "
                                                     "dit_config.mel_dim (80)"),
])
def test_errors_name_the_file_and_field(path, value, message):
    with pytest.raises(ConfigError) as error:
        parse(edit(path, value))
    assert message in str(error.value)


def test_load_reads_both_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config_dict()))
    (tmp_path / "generation_config.json").write_text(json.dumps({"talker_temperature": "hot"}))
    with pytest.raises(ConfigError, match="generation_config.json: talker_temperature must be a number"):
        load_qwen2_5_config(tmp_path)


# ------------------------------------------------------------------------------------------------------ voices


@pytest.fixture
def dit():
    return parse(tiny_config_dict()).token2wav.dit


def test_voices_are_read_and_looked_up_in_any_case(tmp_path, dit):
    written = random_voices(tiny_config_dict(), seed=1)
    torch.save(written, tmp_path / SPEAKER_FILE)
    bank = load_voices(tmp_path, dit)
    assert bank.names == ("Chelsie", "Ethan") and bank.get().name == "Chelsie"
    ethan = bank.get("ETHAN")
    assert ethan.bos_token == written["Ethan"]["bos_token"]
    assert torch.equal(ethan.ref_mel, written["Ethan"]["ref_mel"]) and ethan.cond.shape == (1, dit.enc_emb_dim)
    with pytest.raises(VoiceError, match="unknown voice 'Serena'; available voices: Chelsie, Ethan"):
        bank.get("Serena")


def test_missing_speaker_file_is_a_clear_error(tmp_path, dit):
    with pytest.raises(VoiceError, match="spk_dict.pt: missing; a Qwen2.5-Omni checkpoint needs its speaker file"):
        load_voices(tmp_path, dit)


class Payload:
    """Unpickling this would call print: weights_only loading must refuse it instead."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_speaker_file_with_code_is_refused(tmp_path, dit, capsys):
    with open(tmp_path / SPEAKER_FILE, "wb") as f:
        pickle.dump({"Chelsie": Payload()}, f)
    with pytest.raises(VoiceError, match="not a loadable speaker file"):
        load_voices(tmp_path, dit)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("entry, message", [
    ({"bos_token": 1, "cond": torch.zeros(1, 8)}, "lacks ref_mel"),
    ({"bos_token": 1, "cond": torch.zeros(1, 9), "ref_mel": torch.zeros(1, 5, 80)}, "cond has shape [1, 9]"),
    ({"bos_token": 1, "cond": torch.zeros(8), "ref_mel": torch.zeros(5, 81)}, "ref_mel has shape [5, 81]"),
    ({"bos_token": "x", "cond": torch.zeros(8), "ref_mel": torch.zeros(5, 80)}, "bos_token must be a token id"),
])
def test_malformed_voices_name_the_voice(tmp_path, dit, entry, message):
    torch.save({"Chelsie": entry}, tmp_path / SPEAKER_FILE)
    with pytest.raises(VoiceError, match="voice 'Chelsie'") as error:
        load_voices(tmp_path, dit)
    assert message in str(error.value)
