"""`sparsegrad finetune --model DIR` on local folders of other families, recognised from config.json: a tiny
saved GPT-2 (Conv1D MLP, causal LM), T5 (encoder-decoder MLPs, as a sequence classifier) and Mixtral (fused MoE
experts, causal LM); then `merge` and a plain transformers reload that reproduces the fine-tuned model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsegrad.finetune.cli import main
from sparsegrad.finetune.outputs import load_finetuned

from helpers import chat_tokenizer, finetune_argv, make_csv, make_pairs, word_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def _gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2))


def _mixtral(tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                            pad_token_id=2))


def _t5(tok):
    from transformers import T5Config, T5Model

    # T5's classifier pools the decoder state at the input's EOS: the WordPiece tokenizer ends inputs with [SEP].
    return T5Model(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, decoder_start_token_id=0,
                            dropout_rate=0.0))


FAMILIES = {  # model_type: (builder, tokenizer, task kind, MLP matrices in the 2 blocks)
    "gpt2": (_gpt2, chat_tokenizer, "causal-lm", 4),
    "t5": (_t5, word_tokenizer, "classifier", 8),  # wo/wi of the encoder's and the decoder's blocks
    "mixtral": (_mixtral, chat_tokenizer, "causal-lm", 16),  # (gate_up, down) x 4 experts x 2 blocks
}


def save_family(model_type: str, path: Path) -> Path:
    build, tokenizer, _, _ = FAMILIES[model_type]
    torch.manual_seed(0)
    tok = tokenizer()
    model = build(tok)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_finetune_merge_reload_a_local_folder(model_type, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _, _, kind, n_matrices = FAMILIES[model_type]
    model_dir = save_family(model_type, tmp_path / model_type)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == model_type
    train = make_csv(tmp_path / "data.csv") if kind == "classifier" else make_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    argv = finetune_argv(kind, model_dir, train, "sparsegrad", "dynamic", steps=2, output_dir=out)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert f"{n_matrices} MLP matrices" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["entries_updated"] > 0

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(merged)]) == 0
    print(capsys.readouterr().out)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(str(merged), local_files_only=True).eval()
    tuned, tok, _ = load_finetuned(out / "adapter", None, merge=False)
    batch = tok(["goal match team", "bank market profit"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = tuned.eval()(**batch).logits
        got = reloaded(**batch).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_a_model_without_a_found_mlp_names_its_type_and_the_flag(tmp_path, capsys):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    tok = chat_tokenizer()
    model_dir = tmp_path / "bigcode"
    # not in the registry, and an MLP as wide as the model: the structural fallback finds no hidden -> wider pair
    GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=len(tok), n_embd=32, n_inner=32, n_layer=1, n_head=2,
                                           n_positions=64, bos_token_id=1, eos_token_id=2)).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    argv = finetune_argv("causal-lm", model_dir, make_pairs(tmp_path / "pairs.jsonl"), "sparsegrad", "dynamic",
                         steps=1, output_dir=tmp_path / "run")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'gpt_bigcode'" in err and "--target-modules" in err, err


@pytest.mark.parametrize("method", ["full", "lora"])
def test_full_and_lora_train_conv1d_and_refuse_fused_experts(method, tmp_path, capsys):
    pairs = make_pairs(tmp_path / "pairs.jsonl")
    gpt2 = save_family("gpt2", tmp_path / "gpt2")
    out = tmp_path / "gpt2-run"
    assert main(finetune_argv("causal-lm", gpt2, pairs, method, "dynamic", steps=2, output_dir=out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["entries_updated"] > 0  # the Conv1D weights themselves trained (full) / LoRA factors moved
    tuned, _, _ = load_finetuned(out / "adapter", None, merge=True)
    assert type(tuned.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"

    mixtral = save_family("mixtral", tmp_path / "mixtral")
    capsys.readouterr()
    argv = finetune_argv("causal-lm", mixtral, pairs, method, "dynamic", steps=1, output_dir=tmp_path / "m-run")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"method {method!r} cannot train fused MoE expert matrices" in err, err
