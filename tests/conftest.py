import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import bert_batches, llama_batches, make_tiny_bert, make_tiny_llama  # noqa: F401  (re-exported)

import sparsegrad as sg

BERT_TARGETS = sg.BERT_MLP_TARGETS
LLAMA_TARGETS = sg.LLAMA_MLP_TARGETS


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): 32-wide matrices gain
    nothing from threads, and on a busy machine OpenMP's spinning threads make each tiny op up to 100x slower (a
    tiny LLaMA case of test_architectures: 10 s with 2 threads at load 6, 0.1 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """$SPARSEGRAD_CACHE when set (kept), else a temporary cache removed after the session (0.54 GB); one SmolLM2
    conversion per test session, shared by every slow test."""
    env = os.environ.get("SPARSEGRAD_CACHE")
    if env:
        yield Path(env).expanduser()
        return
    root = tmp_path_factory.mktemp("sparsegrad-cache")
    yield root
    shutil.rmtree(root, ignore_errors=True)
