"""The full-size Instruct model, built on the meta device (no memory), has exactly the released on-disk layout."""

import math

import pytest
import torch
from checkpoints import full_config_dict

from thinktalk.config import parse_config
from thinktalk.models.omni import OmniModel
from thinktalk.weights import checkpoint_layout

TOTAL_PARAMETERS = 35_259_818_545
THINKER_PARAMETERS = 31_719_205_488


@pytest.fixture(scope="module")
def ours() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = OmniModel(parse_config(full_config_dict()), audio_output=True)
    return {key: source.shape for key, source in checkpoint_layout(model).items()}


@pytest.fixture(scope="module")
def reference_on_disk() -> dict[str, tuple[int, ...]]:
    """What the reference's save_pretrained writes for this config: its names and shapes after the save-time
    conversion (experts un-fused, thinker.model.language_model renamed back to thinker.model)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**full_config_dict()))
    state = revert_weight_conversion(model, dict(model.state_dict()))
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def test_names_and_shapes_equal_the_reference_checkpoint_layout(ours, reference_on_disk):
    assert sorted(set(reference_on_disk) - set(ours))[:5] == []
    assert sorted(set(ours) - set(reference_on_disk))[:5] == []
    mismatched = {k: (ours[k], reference_on_disk[k]) for k in ours if ours[k] != reference_on_disk[k]}
    assert mismatched == {}


def test_parameter_counts(ours):
    assert sum(math.prod(shape) for shape in ours.values()) == TOTAL_PARAMETERS
    thinker = sum(math.prod(shape) for key, shape in ours.items() if key.startswith("thinker."))
    assert thinker == THINKER_PARAMETERS


def test_thinker_only_build_has_no_talker_tensors():
    with torch.device("meta"):
        model = OmniModel(parse_config(full_config_dict()), audio_output=False)
    keys = checkpoint_layout(model)
    assert keys and all(key.startswith("thinker.") for key in keys)
    assert sum(math.prod(s.shape) for s in keys.values()) == THINKER_PARAMETERS
