import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import sparsegrad as sg

BERT_TARGETS = sg.BERT_MLP_TARGETS
LLAMA_TARGETS = sg.LLAMA_MLP_TARGETS


def make_tiny_bert(seed: int = 0, layers: int = 2, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def make_tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def bert_batches(n: int, seed: int = 0, batch: int = 4, length: int = 12, num_labels: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 120, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length - 3:] = 0  # one padded row: exercises zero output-gradient rows
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, num_labels, (batch,), generator=g)})
    return out


def llama_batches(n: int, seed: int = 0, batch: int = 2, length: int = 10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (batch, length), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


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
