"""Shared fixtures: the real Qwen tokenizer built offline, and tiny random checkpoints saved by the reference."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import the sibling helper module `checkpoints`

import torch  # noqa: E402

# Without a GPU, Triton's interpreter runs thinktalk's CUDA kernels on CPU tensors (tests/test_triton_kernels.py). It
# is chosen when triton is imported, which transformers does while pytest collects, so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from checkpoints import build_reference, save_reference, tiny_config_dict  # noqa: E402

from thinktalk.processing.tokenizer import build_qwen_tokenizer_files  # noqa: E402


@dataclass
class TinyCheckpoint:
    path: Path
    reference: object  # transformers Qwen3OmniMoeForConditionalGeneration, float32, eval mode
    config: dict


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run several times faster on one thread than on two cores (no OpenMP hand-offs), and far faster
    when the cores are shared with other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    return build_qwen_tokenizer_files(tmp_path_factory.mktemp("qwen_tokenizer"))


def _make_checkpoint(tmp_path_factory, qwen_dir: Path, name: str, seed: int, **config) -> TinyCheckpoint:
    cfg = tiny_config_dict(**config)
    reference = build_reference(cfg, seed=seed)
    path = save_reference(reference, tmp_path_factory.mktemp(name))
    for file in qwen_dir.iterdir():
        shutil.copy(file, path / file.name)
    return TinyCheckpoint(path, reference, cfg)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, qwen_dir) -> TinyCheckpoint:
    """The full structure (thinker, talker with a shared expert, code2wav), norm_topk_prob true."""
    return _make_checkpoint(tmp_path_factory, qwen_dir, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_thinker_only(tmp_path_factory, qwen_dir) -> TinyCheckpoint:
    """A thinker-only checkpoint (like -Thinking / -Captioner) with norm_topk_prob false."""
    return _make_checkpoint(tmp_path_factory, qwen_dir, "tiny_thinker", seed=1, norm_topk_prob=False, talker=False)
