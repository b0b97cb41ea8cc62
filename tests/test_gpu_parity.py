"""thinktalk against the reference on the full-size Instruct model in bf16 on a GPU, and the same checks on the CPU
with the tiny config in float32 and bf16 (so that the test logic itself runs everywhere).

One copy of the weights: thinktalk's model is drawn on the device (thinktalk.random_weights) and the reference
(transformers) is built on the meta device with every parameter set to thinktalk's tensor. The three checks (thinker
top-1 over a 512-token prompt, 32 greedy text tokens, 16 frames of greedy codec codes) and their bf16 near-tie
rule live in bench/parity_checks.py, which bench/gpu_run.py also runs on the device run's model.

The full-size config is the released one, kept in tests/data/.
"""

import gc
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from checkpoints import full_config_dict, tiny_config_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import parity_checks  # noqa: E402

from thinktalk import Omni  # noqa: E402
from thinktalk.config import parse_config  # noqa: E402
from thinktalk.processing.audio import AudioFeatureConfig  # noqa: E402
from thinktalk.processing.multimodal import MediaOptions  # noqa: E402
from thinktalk.processing.tokenizer import Tokenizer  # noqa: E402
from thinktalk.processing.vision import VisionProcessorConfig  # noqa: E402
from thinktalk.random_weights import random_model, tied_reference  # noqa: E402

SEED = 5

CASES = [
    pytest.param(("cpu", "tiny", torch.float32), id="cpu-tiny-float32"),
    pytest.param(("cpu", "tiny", torch.bfloat16), id="cpu-tiny-bfloat16"),  # the bf16 logic, run everywhere
    pytest.param(("cuda", "full", torch.bfloat16), id="cuda-full-bfloat16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (80 GB)")),
]


@pytest.fixture(scope="module", params=CASES)
def pair(request, qwen_dir):
    device, size, dtype = request.param
    config = tiny_config_dict() if size == "tiny" else full_config_dict()
    model = random_model(config, device, dtype, SEED)
    reference, _ = tied_reference(model, config)
    media = MediaOptions(AudioFeatureConfig(), VisionProcessorConfig())
    omni = Omni(parse_config(config), model, Tokenizer.from_dir(qwen_dir), qwen_dir, media)
    yield SimpleNamespace(omni=omni, reference=reference, device=torch.device(device), exact=dtype == torch.float32)
    del omni, model, reference
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("check", parity_checks.CHECKS, ids=lambda check: check.__name__)
def test_parity(pair, check):
    result = check(pair.omni, pair.reference, pair.device, pair.exact)
    print(f"{result.name}: {result.value} ({result.detail})")
    assert result.passed, result.detail


def test_near_tie_rule():
    """A pick within TIE_RELATIVE of the best |logit| is a near-tie; one further away is not."""
    logits = torch.tensor([10.0, 9.9, 5.0, -20.0])
    ties = parity_checks.near_tie(logits.expand(3, -1), torch.tensor([0, 1, 2]), parity_checks.TIE_RELATIVE)
    assert ties.tolist() == [True, True, False]
    assert parity_checks.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert parity_checks.first_divergence([1, 2], [1, 2]) is None
