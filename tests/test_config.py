"""Config parsing: the released Qwen3-Omni config, both rope spellings, thinker-only checkpoints, generation
defaults, immutability, and a ConfigError naming the file and the dotted field for every kind of bad input."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
from checkpoints import full_config_dict

from thinktalk.config import ConfigError, SamplingConfig, load_config, parse_config

DELETE = object()  # an edit that removes the field


@pytest.fixture(scope="module")
def full():
    return parse_config(full_config_dict())


def attribute(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def edited(config: dict, edits: dict) -> dict:
    """A deep copy of `config` with each dotted path set to its value (or removed for DELETE)."""
    config = copy.deepcopy(config)
    for dotted, value in edits.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return config


def write_checkpoint(directory: Path, config, generation=None) -> Path:
    """A checkpoint directory holding only config.json (text as given, or JSON) and maybe generation_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def transformers4_rope(config: dict) -> dict:
    """The transformers-4.x spelling: each `rope_parameters` becomes `rope_theta` plus `rope_scaling` (which holds
    mrope_section and friends, or is null for plain 1-D rotary)."""
    config = copy.deepcopy(config)
    converted = 0

    def walk(node):
        nonlocal converted
        if isinstance(node, dict):
            if "rope_parameters" in node:
                params = dict(node.pop("rope_parameters"))
                node["rope_theta"] = params.pop("rope_theta")
                node["rope_scaling"] = params if "mrope_section" in params else None
                converted += 1
            for value in node.values():
                walk(value)

    walk(config)
    assert converted == 4, "expected thinker text, talker text, code predictor and code2wav rope settings"
    return config


# ----------------------------------------------------------------------------------------------------------------
# The released config


@pytest.mark.parametrize("dotted, expected", [
    ("thinker.text.num_layers", 48),
    ("thinker.text.hidden_size", 2048),
    ("thinker.text.num_heads", 32),
    ("thinker.text.num_kv_heads", 4),
    ("thinker.text.head_dim", 128),
    ("thinker.text.vocab_size", 152064),
    ("thinker.text.moe.num_experts", 128),
    ("thinker.text.moe.top_k", 8),
    ("thinker.text.moe.expert_intermediate_size", 768),
    ("thinker.text.moe.norm_topk_prob", True),
    ("thinker.text.moe.shared_expert_intermediate_size", 0),
    ("thinker.text.rope.theta", 1_000_000.0),
    ("thinker.text.rope.mrope_section", (24, 20, 20)),
    ("thinker.audio.num_mel_bins", 128),
    ("thinker.audio.n_window", 50),
    ("thinker.audio.num_layers", 32),
    ("thinker.vision.patch_size", 16),
    ("thinker.vision.spatial_merge_size", 2),
    ("thinker.vision.deepstack_visual_indexes", (8, 16, 24)),
    ("thinker.position_id_per_seconds", 13),
    ("talker.text.num_layers", 20),
    ("talker.text.moe.num_experts", 128),
    ("talker.text.moe.top_k", 6),
    ("talker.text.moe.shared_expert_intermediate_size", 768),
    ("talker.text.rope.mrope_section", (24, 20, 20)),
    ("talker.code_predictor.num_layers", 5),
    ("talker.code_predictor.moe", None),
    ("talker.code_predictor.rope.mrope_section", None),
    ("talker.num_code_groups", 16),
    ("talker.accept_hidden_layer", 24),
    ("talker.thinker_hidden_size", 2048),
    ("code2wav.samples_per_frame", 1920),
    ("code2wav.sample_rate", 24000),
    ("code2wav.codebook_size", 2048),
    ("code2wav.num_quantizers", 16),
    ("code2wav.sliding_window", 72),
    ("code2wav.rope_theta", 10000.0),
])
def test_full_config_values(full, dotted, expected):
    assert attribute(full, dotted) == expected


@pytest.mark.parametrize("dotted, expected", [
    ("im_start_token_id", 151644), ("im_end_token_id", 151645), ("system_token_id", 8948),
    ("user_token_id", 872), ("assistant_token_id", 77091),
    ("tts_pad_token_id", 151671), ("tts_bos_token_id", 151672), ("tts_eos_token_id", 151673),
    ("thinker.audio_token_id", 151675), ("thinker.audio_start_token_id", 151669),
    ("thinker.audio_end_token_id", 151670), ("thinker.image_token_id", 151655), ("thinker.video_token_id", 151656),
    ("thinker.vision_start_token_id", 151652), ("thinker.vision_end_token_id", 151653),
    ("talker.codec_pad_id", 2148), ("talker.codec_bos_id", 2149), ("talker.codec_eos_id", 2150),
    ("talker.codec_nothink_id", 2155), ("talker.codec_think_bos_id", 2156), ("talker.codec_think_eos_id", 2157),
])
def test_full_config_special_ids(full, dotted, expected):
    assert attribute(full, dotted) == expected


def test_full_config_has_audio_output_and_defaults(full):
    assert full.has_audio_output
    assert full.stop_token_ids == (151645,)
    assert full.thinker.text.layer_is_sparse(0) and full.thinker.text.layer_is_sparse(47)


@pytest.mark.parametrize("name, codec_id", [("chelsie", 2301), ("Ethan", 2302), ("AIDEN", 2303), ("eThAn", 2302)])
def test_speaker_lookup_is_case_insensitive(full, name, codec_id):
    assert full.talker.speaker_id(name) == codec_id


def test_unknown_speaker_lists_the_voices(full):
    assert full.talker.speakers == (("chelsie", 2301), ("ethan", 2302), ("aiden", 2303))
    with pytest.raises(ValueError, match="unknown voice 'bob'") as error:
        full.talker.speaker_id("bob")
    assert "chelsie, ethan, aiden" in str(error.value)


def test_transformers4_rope_form_parses_to_the_same_config(full):
    old = transformers4_rope(full_config_dict())
    assert old["thinker_config"]["text_config"]["rope_scaling"]["mrope_section"] == [24, 20, 20]
    assert parse_config(old) == full


def test_transformers4_rope_form_without_mrope_section_is_an_error(tmp_path):
    old = transformers4_rope(full_config_dict())
    del old["thinker_config"]["text_config"]["rope_scaling"]["mrope_section"]
    path = write_checkpoint(tmp_path, old)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    field = "thinker_config.text_config.rope_scaling.mrope_section"
    assert str(error.value).startswith(f"{path / 'config.json'}: {field} "), str(error.value)


@pytest.mark.parametrize("edits", [
    {"talker_config": DELETE, "code2wav_config": DELETE, "enable_audio_output": DELETE},
    {"talker_config": DELETE, "code2wav_config": DELETE, "enable_audio_output": False},
    {"enable_audio_output": False},
], ids=["no-talker-sections", "no-talker-sections-audio-off", "audio-off"])
def test_thinker_only_config(full, edits):
    cfg = parse_config(edited(full_config_dict(), edits))
    assert not cfg.has_audio_output
    assert cfg.talker is None and cfg.code2wav is None
    assert cfg.thinker == full.thinker


@pytest.mark.parametrize("dotted", ["", "thinker", "thinker.text", "thinker.text.moe", "thinker.text.rope",
                                    "thinker.audio", "thinker.vision", "talker", "talker.code_predictor",
                                    "code2wav", "thinker_sampling"])
def test_configs_are_frozen(full, dotted):
    obj = attribute(full, dotted) if dotted else full
    field = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, None)


def test_config_collections_are_immutable(full):
    assert isinstance(full.talker.speakers, tuple)
    assert isinstance(full.thinker.text.moe.mlp_only_layers, tuple)
    assert isinstance(full.code2wav.upsample_rates, tuple)


# ----------------------------------------------------------------------------------------------------------------
# generation_config.json


def test_load_config_without_generation_config_uses_defaults(tmp_path):
    cfg = load_config(write_checkpoint(tmp_path, full_config_dict()))
    assert cfg.thinker_sampling == SamplingConfig(do_sample=False, max_new_tokens=1024)
    assert cfg.talker_sampling == SamplingConfig(do_sample=True, temperature=0.9, top_k=50, top_p=1.0,
                                                 repetition_penalty=1.05, max_new_tokens=4096)


def test_load_config_reads_generation_config(tmp_path):
    generation = {
        "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1,
        "max_new_tokens": 77, "eos_token_id": [151645, 151643],
        "talker_do_sample": False, "talker_temperature": 0.5, "talker_top_k": 10, "talker_top_p": 0.9,
        "talker_repetition_penalty": 1.2, "talker_max_new_tokens": 300,
    }
    cfg = load_config(write_checkpoint(tmp_path, full_config_dict(), generation))
    assert cfg.thinker_sampling == SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                                                  repetition_penalty=1.1, max_new_tokens=77)
    assert cfg.talker_sampling == SamplingConfig(do_sample=False, temperature=0.5, top_k=10, top_p=0.9,
                                                 repetition_penalty=1.2, max_new_tokens=300)
    assert cfg.stop_token_ids == (151645, 151643)


def test_partial_generation_config_keeps_other_defaults(tmp_path):
    cfg = load_config(write_checkpoint(tmp_path, full_config_dict(), {"temperature": 0.6, "talker_top_k": 5}))
    assert cfg.thinker_sampling == SamplingConfig(temperature=0.6, max_new_tokens=1024)
    assert cfg.talker_sampling == SamplingConfig(do_sample=True, temperature=0.9, top_k=5, top_p=1.0,
                                                 repetition_penalty=1.05, max_new_tokens=4096)


@pytest.mark.parametrize("eos, stops", [
    ([151645, 151643], (151645, 151643)),
    (151643, (151645, 151643)),
    (151645, (151645,)),
    ([], (151645,)),
])
def test_generation_eos_ids_extend_the_stop_ids(tmp_path, eos, stops):
    cfg = load_config(write_checkpoint(tmp_path, full_config_dict(), {"eos_token_id": eos}))
    assert cfg.stop_token_ids == stops


# ----------------------------------------------------------------------------------------------------------------
# Errors: each names the file and the dotted field


CONFIG_ERRORS = {
    "wrong-model-type": ({"model_type": "qwen2_5_omni"}, "model_type", ["'qwen3_omni_moe'", "'qwen2_5_omni'"]),
    "missing-model-type": ({"model_type": DELETE}, "model_type", ["missing"]),
    "missing-hidden-size": ({"thinker_config.text_config.hidden_size": DELETE},
                            "thinker_config.text_config.hidden_size", ["missing"]),
    "missing-thinker": ({"thinker_config": DELETE}, "thinker_config", ["missing"]),
    "string-for-int": ({"thinker_config.text_config.num_hidden_layers": "48"},
                       "thinker_config.text_config.num_hidden_layers", ["integer", "'48'"]),
    "bool-for-int": ({"talker_config.num_code_groups": True}, "talker_config.num_code_groups", ["integer", "True"]),
    "heads-not-dividing-hidden": ({"thinker_config.text_config.num_attention_heads": 24,
                                   "thinker_config.text_config.head_dim": DELETE},
                                  "thinker_config.text_config.num_attention_heads", ["(24)", "(2048)"]),
    "kv-heads-not-dividing-heads": ({"thinker_config.text_config.num_key_value_heads": 5},
                                    "thinker_config.text_config.num_key_value_heads", ["(5)", "(32)"]),
    "mrope-section-sum": ({"thinker_config.text_config.rope_parameters.mrope_section": [24, 20, 21]},
                          "thinker_config.text_config.rope_parameters.mrope_section",
                          ["head_dim/2=64", "(24, 20, 21)"]),
    "talker-mrope-section-length": ({"talker_config.text_config.rope_parameters.mrope_section": [44, 20]},
                                    "talker_config.text_config.rope_parameters.mrope_section", ["(44, 20)"]),
    "top-k-over-experts": ({"thinker_config.text_config.num_experts_per_tok": 129},
                           "thinker_config.text_config.num_experts_per_tok", ["(129)", "num_experts (128)"]),
    "talker-top-k-over-experts": ({"talker_config.text_config.num_experts_per_tok": 200},
                                  "talker_config.text_config.num_experts_per_tok",
                                  ["(200)", "num_local_experts (128)"]),
    "yarn-rope-type": ({"thinker_config.text_config.rope_parameters.rope_type": "yarn"},
                       "thinker_config.text_config.rope_parameters.rope_type", ["'yarn'"]),
    "negative-rope-theta": ({"code2wav_config.rope_parameters.rope_theta": -1.0},
                      "code2wav_config.rope_parameters.rope_theta", ["> 0", "-1.0"]),
    "speaker-ids-not-ints": ({"talker_config.speaker_id": {"ethan": "2302"}}, "talker_config.speaker_id", ["'2302'"]),
}


@pytest.mark.parametrize("edits, field, fragments", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_config_error_names_file_and_field(tmp_path, edits, field, fragments):
    path = write_checkpoint(tmp_path, edited(full_config_dict(), edits))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path / 'config.json'}: {field} "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


GENERATION_ERRORS = {
    "zero-temperature": ({"temperature": 0}, "temperature", ["> 0"]),
    "zero-talker-temperature": ({"talker_temperature": 0}, "talker_temperature", ["> 0"]),
    "top-p-over-one": ({"top_p": 1.5}, "top_p", ["1.5"]),
    "negative-talker-top-k": ({"talker_top_k": -1}, "talker_top_k", [">= 0", "-1"]),
    "zero-max-new-tokens": ({"max_new_tokens": 0}, "max_new_tokens", [">= 1"]),
    "string-temperature": ({"temperature": "hot"}, "temperature", ["number", "'hot'"]),
    "string-do-sample": ({"talker_do_sample": "yes"}, "talker_do_sample", ["true or false", "'yes'"]),
    "string-eos": ({"eos_token_id": ["</s>"]}, "eos_token_id", ["'</s>'"]),
}


@pytest.mark.parametrize("generation, field, fragments", GENERATION_ERRORS.values(), ids=GENERATION_ERRORS.keys())
def test_generation_config_error_names_file_and_field(tmp_path, generation, field, fragments):
    path = write_checkpoint(tmp_path, full_config_dict(), generation)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path / 'generation_config.json'}: {field} "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
def test_non_json_file_is_an_error_naming_it(tmp_path, file):
    path = write_checkpoint(tmp_path, full_config_dict(), {})
    (path / file).write_text('{"model_type": "qwen3_omni_moe",')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path / file}: is not valid JSON"), str(error.value)


def test_config_that_is_not_an_object_is_an_error(tmp_path):
    path = write_checkpoint(tmp_path, "[1, 2]")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path / 'config.json'}: top level must be a JSON object"), str(error.value)


def test_missing_config_json_is_an_error_naming_it(tmp_path):
    (tmp_path / "generation_config.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: missing"), str(error.value)


@pytest.mark.parametrize("make", [lambda p: p.write_text("{}"), lambda p: None], ids=["a-file", "absent"])
def test_path_that_is_not_a_directory_is_an_error_naming_it(tmp_path, make):
    path = tmp_path / "checkpoint"
    make(path)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: is not a directory"), str(error.value)
