"""Strict checkpoint loading: a sharded save by the reference loads exactly; every kind of broken checkpoint is a
CheckpointError (or ConfigError) naming the tensor, the shard or the field at fault."""

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoints import build_reference, save_reference, tiny_config_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from thinktalk import Omni
from thinktalk.config import ConfigError
from thinktalk.weights import INDEX_FILE, SINGLE_FILE, CheckpointError

VOCAB = 512  # small files; the config parser does not require the vocabulary to cover the special ids
NORM = "thinker.model.norm.weight"
EXPERT = "thinker.model.layers.1.mlp.experts.3.up_proj.weight"


@dataclass
class Saved:
    sharded: Path
    single: Path
    reference: object


@pytest.fixture(scope="module")
def saved(tmp_path_factory, qwen_dir) -> Saved:
    """One thinker-only reference model saved twice: in several shards with an index, and as one file."""
    config = tiny_config_dict(talker=False)
    config["thinker_config"]["text_config"]["vocab_size"] = VOCAB
    reference = build_reference(config, seed=3)
    sharded = save_reference(reference, tmp_path_factory.mktemp("sharded"), max_shard_size="500KB")
    single = save_reference(reference, tmp_path_factory.mktemp("single"))
    for directory in (sharded, single):
        for file in qwen_dir.iterdir():
            shutil.copy(file, directory / file.name)
    return Saved(sharded, single, reference)


@pytest.fixture
def broken(saved, tmp_path) -> Path:
    """A private copy of the sharded checkpoint, for one test to break."""
    return Path(shutil.copytree(saved.sharded, tmp_path / "checkpoint"))


def load(path: Path, dtype: str = "float32", **kwargs) -> Omni:
    return Omni.from_pretrained(path, device="cpu", dtype=dtype, **kwargs)


def read_index(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX_FILE).read_text())["weight_map"]


def write_index(path: Path, weight_map: dict[str, str]) -> None:
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"] = weight_map
    (path / INDEX_FILE).write_text(json.dumps(index))


def shard_of(path: Path, key: str) -> Path:
    return path / read_index(path)[key]


def edit_shard(path: Path, key: str, edit) -> Path:
    """Rewrite the shard holding `key` after `edit(tensors)` changed its dict of tensors; the index is updated to
    list exactly what the shard now holds, so only the edit itself is wrong."""
    shard = shard_of(path, key)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    weight_map = {k: v for k, v in read_index(path).items() if v != shard.name}
    write_index(path, weight_map | {k: shard.name for k in tensors})
    return shard


def expect_error(path: Path, error_type: type, *fragments: str) -> str:
    with pytest.raises(error_type) as error:
        load(path)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def header_size(shard: Path) -> int:
    """Bytes of a safetensors file before its data: the 8-byte length, then the JSON header."""
    with shard.open("rb") as file:
        return 8 + struct.unpack("<Q", file.read(8))[0]


def truncate(shard: Path, size: int) -> None:
    with shard.open("r+b") as file:
        file.truncate(size)


def logits(omni: Omni, ids: list[int]) -> torch.Tensor:
    tensor = torch.tensor([ids])
    positions = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        return omni.model.thinker(omni.model.thinker.embed(tensor), positions)[0][0]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints that load


def test_fixture_is_really_sharded(saved):
    weight_map = read_index(saved.sharded)
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3
    assert sorted(p.name for p in saved.sharded.glob("*.safetensors")) == shards
    assert not (saved.sharded / SINGLE_FILE).exists()
    assert EXPERT in weight_map and NORM in weight_map
    assert sorted(p.name for p in saved.single.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (saved.single / INDEX_FILE).exists()


@pytest.fixture(scope="module")
def sharded_model(saved) -> Omni:
    return load(saved.sharded)


def test_sharded_and_single_file_checkpoints_give_the_same_model_and_logits(saved, sharded_model):
    single = load(saved.single)
    assert sharded_model.model.state_dict().keys() == single.model.state_dict().keys()
    for name, tensor in sharded_model.model.state_dict().items():
        assert torch.equal(tensor, single.model.state_dict()[name]), name
    ids = torch.randint(0, VOCAB, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = logits(sharded_model, ids)
    assert torch.equal(ours, logits(single, ids))
    with torch.no_grad():
        theirs = saved.reference.thinker(input_ids=torch.tensor([ids])).logits[0]
    assert theirs.std() > 1.0, "weights too weak for a meaningful comparison"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_bfloat16_load_equals_float32_rounded(saved, sharded_model):
    half = load(saved.sharded, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    full = sharded_model.model.state_dict()
    for name, tensor in half.model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name


def test_audio_output_off_skips_talker_and_code2wav(tiny):
    with safe_open(str(tiny.path / SINGLE_FILE), framework="pt") as shard:
        prefixes = {key.split(".")[0] for key in shard.keys()}
    assert {"thinker", "talker", "code2wav"} <= prefixes
    omni = load(tiny.path, audio_output=False)
    assert omni.cfg.has_audio_output
    assert omni.model.talker is None and omni.model.code2wav is None
    assert all(name.startswith("thinker.") for name in omni.model.state_dict())


def test_audio_output_on_a_thinker_only_checkpoint_is_an_error(saved):
    with pytest.raises(ValueError, match="audio output was requested") as error:
        load(saved.sharded, audio_output=True)
    assert "talker" in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Broken tensors: the index stays consistent, the tensor itself is wrong


@pytest.mark.parametrize("key", [NORM, EXPERT], ids=["norm", "one-expert"])
def test_missing_tensor_is_named(broken, key):
    edit_shard(broken, key, lambda tensors: tensors.pop(key))
    expect_error(broken, CheckpointError, "1 tensor(s) missing", key)


def test_extra_tensor_is_named(broken):
    extra = "thinker.model.layers.0.mlp.experts.99.up_proj.weight"
    edit_shard(broken, NORM, lambda tensors: tensors.update({extra: torch.zeros(32, 64)}))
    expect_error(broken, CheckpointError, "1 unexpected tensor(s)", extra)


@pytest.mark.parametrize("key, shape, expected", [
    (NORM, (65,), (64,)),
    (EXPERT, (32, 63), (32, 64)),
    ("thinker.lm_head.weight", (VOCAB + 1, 64), (VOCAB, 64)),
], ids=["norm", "one-expert", "lm-head"])
def test_wrong_shape_names_tensor_and_both_shapes(broken, key, shape, expected):
    shard = edit_shard(broken, key, lambda tensors: tensors.update({key: torch.ones(shape)}))
    expect_error(broken, CheckpointError, str(shard), f"tensor {key} has shape {list(shape)}",
                 f"expected {list(expected)}")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_non_float_dtype_is_named(broken, dtype):
    shard = edit_shard(broken, NORM, lambda tensors: tensors.update({NORM: tensors[NORM].to(dtype)}))
    expect_error(broken, CheckpointError, str(shard), f"tensor {NORM} has dtype {dtype}", "floating")


# ----------------------------------------------------------------------------------------------------------------
# Broken files


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_shard_is_named(broken, where):
    shard = shard_of(broken, EXPERT)
    header = header_size(shard)
    truncate(shard, (header + shard.stat().st_size) // 2 if where == "data" else header // 2)
    expect_error(broken, CheckpointError, str(shard), "truncated or corrupt")


def test_index_naming_an_absent_shard(broken):
    shard = shard_of(broken, EXPERT)
    shard.unlink()
    expect_error(broken, CheckpointError, str(broken / INDEX_FILE), f"names shard {shard.name}", "not in")


def test_index_entry_pointing_at_the_wrong_shard(broken):
    """The index moves one key to another shard: whichever of the two shards is checked first is named."""
    weight_map = read_index(broken)
    right = weight_map[EXPERT]
    wrong = next(name for name in sorted(set(weight_map.values())) if name != right)
    write_index(broken, weight_map | {EXPERT: wrong})
    message = expect_error(broken, CheckpointError, "does not hold the tensors the index assigns it", EXPERT)
    assert f"{broken / wrong}:" in message or f"{broken / right}:" in message, message


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not a valid safetensors index"),
    ('{"metadata": {}}', "not a valid safetensors index"),
    ('{"weight_map": ["model-00001-of-00004.safetensors"]}', "weight_map must map tensor names to shard file names"),
    ('{"weight_map": {"thinker.lm_head.weight": 1}}', "weight_map must map tensor names to shard file names"),
], ids=["not-json", "no-weight-map", "weight-map-list", "shard-not-a-name"])
def test_malformed_index(broken, text, problem):
    (broken / INDEX_FILE).write_text(text)
    expect_error(broken, CheckpointError, f"{broken / INDEX_FILE}: {problem}")


def test_no_weight_files(broken):
    for file in [*broken.glob("*.safetensors"), broken / INDEX_FILE]:
        file.unlink()
    expect_error(broken, CheckpointError, str(broken), "no weights found", SINGLE_FILE, INDEX_FILE)


@pytest.mark.parametrize("edit, fragments", [
    (lambda c: c.update(model_type="qwen3_moe"), ["model_type", "'qwen3_moe'"]),
    (lambda c: c["thinker_config"]["text_config"].pop("num_hidden_layers"),
     ["thinker_config.text_config.num_hidden_layers", "missing"]),
], ids=["wrong-model-type", "missing-field"])
def test_bad_config_is_named(broken, edit, fragments):
    config = json.loads((broken / "config.json").read_text())
    edit(config)
    (broken / "config.json").write_text(json.dumps(config))
    expect_error(broken, ConfigError, str(broken / "config.json"), *fragments)
