"""The architecture matrix (PEFT's test_decoder_models.py pattern): tiny random models of every transformers family
the MLP registry covers (hidden 32, 2 layers, MLP 64), each checked for automatic targets (against the kinds
written out by hand below, not the registry), exact conversion, two training steps in both supports, adapter and
merge round trips and, for generators (causal LMs, seq2seq, Whisper), `generate`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsegrad as sg

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread

transformers = pytest.importorskip("transformers")

H, I, V, L = 32, 64, 100, 2
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENC = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I, vocab_size=V,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, max_position_embeddings=32,
           pad_token_id=0)
DEC = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, num_key_value_heads=1, intermediate_size=I,
           vocab_size=V, max_position_embeddings=32, **TOKENS)
MOE = dict(DEC, num_experts_per_tok=2, moe_intermediate_size=I)
S2S = dict(d_model=H, encoder_layers=L, decoder_layers=L, encoder_attention_heads=2, decoder_attention_heads=2,
           encoder_ffn_dim=I, decoder_ffn_dim=I, vocab_size=V, dropout=0.0, max_position_embeddings=32,
           decoder_start_token_id=1, **TOKENS)


def mlp(prefix: str, *names: str) -> set[str]:
    return {f"{prefix}.{n}" for n in names}


LLAMA_KINDS = mlp("model.layers.*.mlp", "gate_proj", "up_proj", "down_proj")
MOE_KINDS = mlp("model.layers.*.mlp.experts.*", "gate_up_proj", "down_proj")
BERT_KINDS = {"{p}.encoder.layer.*.intermediate.dense", "{p}.encoder.layer.*.output.dense"}

# model_type: (config kwargs, task, expected kinds, expected number of converted matrices)
SPECS = {
    "bert": (ENC, "cls", {k.format(p="bert") for k in BERT_KINDS}, 4),
    "roberta": (ENC, "cls", {k.format(p="roberta") for k in BERT_KINDS}, 4),
    "xlm-roberta": (ENC, "cls", {k.format(p="roberta") for k in BERT_KINDS}, 4),
    "electra": (dict(ENC, embedding_size=H), "cls", {k.format(p="electra") for k in BERT_KINDS}, 4),
    "deberta-v2": (ENC, "cls", {k.format(p="deberta") for k in BERT_KINDS}, 4),
    "distilbert": (dict(dim=H, n_layers=L, n_heads=2, hidden_dim=I, vocab_size=V, dropout=0.0, attention_dropout=0.0,
                        num_labels=3, max_position_embeddings=32, pad_token_id=0), "cls",
                   mlp("distilbert.transformer.layer.*.ffn", "lin1", "lin2"), 4),
    "albert": (dict(ENC, embedding_size=16), "cls",
               mlp("albert.encoder.albert_layer_groups.*.albert_layers.*", "ffn", "ffn_output"), 2),
    "modernbert": (dict(ENC, hidden_activation="gelu", global_attn_every_n_layers=1, embedding_dropout=0.0,
                        mlp_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0, **TOKENS), "cls",
                   mlp("model.layers.*.mlp", "Wi", "Wo"), 4),
    "vit": (dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I, image_size=16,
                 patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "image",
            mlp("vit.layers.*.mlp", "fc1", "fc2"), 4),
    "gpt2": (dict(n_embd=H, n_layer=L, n_head=2, n_inner=I, vocab_size=V, n_positions=32, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, **TOKENS), "lm", mlp("transformer.h.*.mlp", "c_fc", "c_proj"), 4),
    "gpt_neox": (dict(DEC, hidden_dropout=0.0, attention_dropout=0.0), "lm",
                 mlp("gpt_neox.layers.*.mlp", "dense_h_to_4h", "dense_4h_to_h"), 4),
    "gptj": (dict(n_embd=H, n_layer=L, n_head=2, n_inner=I, vocab_size=V, n_positions=32, rotary_dim=8,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **TOKENS), "lm",
             mlp("transformer.h.*.mlp", "fc_in", "fc_out"), 4),
    "opt": (dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, ffn_dim=I, vocab_size=V,
                 word_embed_proj_dim=H, max_position_embeddings=32, dropout=0.0, **TOKENS), "lm",
            mlp("model.decoder.layers.*", "fc1", "fc2"), 4),
    "bloom": (dict(hidden_size=H, n_layer=L, n_head=2, vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0,
                   **TOKENS), "lm", mlp("transformer.h.*.mlp", "dense_h_to_4h", "dense_4h_to_h"), 4),
    "falcon": (dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, vocab_size=V, hidden_dropout=0.0,
                    attention_dropout=0.0, **TOKENS), "lm",
               mlp("transformer.h.*.mlp", "dense_h_to_4h", "dense_4h_to_h"), 4),
    "llama": (DEC, "lm", LLAMA_KINDS, 6),
    "mistral": (DEC, "lm", LLAMA_KINDS, 6),
    "qwen2": (DEC, "lm", LLAMA_KINDS, 6),
    "qwen3": (dict(DEC, head_dim=16), "lm", LLAMA_KINDS, 6),
    "gemma": (dict(DEC, head_dim=16), "lm", LLAMA_KINDS, 6),
    "gemma2": (dict(DEC, head_dim=16), "lm", LLAMA_KINDS, 6),
    "gemma3_text": (dict(DEC, head_dim=16), "lm", LLAMA_KINDS, 6),
    "phi": (dict(DEC, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0), "lm",
            mlp("model.layers.*.mlp", "fc1", "fc2"), 4),
    "phi3": (DEC, "lm", mlp("model.layers.*.mlp", "gate_up_proj", "down_proj"), 4),
    "mixtral": (dict(MOE, num_local_experts=4), "lm", MOE_KINDS, 16),
    "qwen2_moe": (dict(MOE, num_experts=4, shared_expert_intermediate_size=I), "lm",
                  MOE_KINDS | mlp("model.layers.*.mlp.shared_expert", "gate_proj", "up_proj", "down_proj"), 22),
    "qwen3_moe": (dict(MOE, num_experts=4, head_dim=16), "lm", MOE_KINDS, 16),
    "t5": (dict(d_model=H, d_ff=I, num_layers=L, num_heads=2, d_kv=16, vocab_size=V, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", decoder_start_token_id=0, **TOKENS), "s2s",
           mlp("encoder.block.*.layer.*.DenseReluDense", "wi_0", "wi_1", "wo")
           | mlp("decoder.block.*.layer.*.DenseReluDense", "wi_0", "wi_1", "wo"), 12),
    "bart": (S2S, "s2s", mlp("model.encoder.layers.*", "fc1", "fc2") | mlp("model.decoder.layers.*", "fc1", "fc2"), 8),
    "whisper": (dict(S2S, num_mel_bins=8, max_source_positions=16, max_target_positions=32), "speech",
                mlp("model.encoder.layers.*", "fc1", "fc2") | mlp("model.decoder.layers.*", "fc1", "fc2"), 8),
}

AUTO = {"cls": "AutoModelForSequenceClassification", "image": "AutoModelForImageClassification",
        "lm": "AutoModelForCausalLM", "s2s": "AutoModelForSeq2SeqLM", "speech": "AutoModelForSpeechSeq2Seq"}


def build(model_type: str, seed: int = 0) -> nn.Module:
    kwargs, task, _, _ = SPECS[model_type]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, AUTO[task]).from_config(config).eval()


def batches(model_type: str, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    task = SPECS[model_type][1]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, V, (2, 8), generator=g)
        if task == "cls":
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, 3, (2,), generator=g)})
        elif task == "image":
            out.append({"pixel_values": torch.randn(2, 3, 16, 16, generator=g),
                        "labels": torch.randint(0, 3, (2,), generator=g)})
        elif task == "lm":
            out.append({"input_ids": ids, "labels": ids.clone()})
        elif task == "s2s":
            out.append({"input_ids": ids, "labels": ids[:, :5].clone()})
        else:
            out.append({"input_features": torch.randn(2, 8, 32, generator=g), "labels": ids[:, :5].clone()})
    return out


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
@pytest.mark.parametrize("model_type", list(SPECS))
def test_architecture(model_type, support, tmp_path):
    _, task, kinds, count = SPECS[model_type]
    base = build(model_type)
    model = copy.deepcopy(base)
    config = sg.SparseGradConfig(density=0.05, support=support)  # target_modules=None: the registry's MLP
    bases = sg.estimate_bases(model, config, batches(model_type, 1), progress=False)
    assert list(model.state_dict()) == list(base.state_dict())  # calibration leaves the model as it was
    sg.get_sparsegrad_model(model, config, bases)
    layers = sg.sparsegrad_layers(model)
    assert {layer.kind for layer in layers.values()} == kinds and len(layers) == count

    probe = batches(model_type, 1, seed=9)[0]
    torch.testing.assert_close(logits(model, probe), logits(base, probe), rtol=0, atol=0)

    opt = sg.create_optimizer(model, lr=1e-2)
    model.train()
    for batch in batches(model_type, 2, seed=1):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = logits(model, probe)
    assert not torch.equal(trained, logits(base, probe))
    assert sum(layer.entries_updated() for layer in layers.values()) > 0
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "delta_values" not in n
              and not n.endswith("bias") and not any(n == f"{m}.weight" for m in layers)
              and not n.startswith(("classifier", "score"))]
    assert not frozen, f"trains densely by default: {frozen[:3]}"

    sg.save_adapter(model, tmp_path / "adapter")
    reloaded = sg.load_adapter(build(model_type), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, probe), trained, rtol=0, atol=0)

    generates = task in ("lm", "s2s", "speech")
    if generates:  # greedy, 3 tokens, from the first probe example's inputs
        inputs = {k: v[:1] for k, v in probe.items() if k in ("input_ids", "input_features")}
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    merged = sg.merge_and_unload(model)
    assert list(merged.state_dict()) == list(base.state_dict())
    assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    torch.testing.assert_close(logits(merged, probe), trained)
    if generates:
        assert torch.equal(merged.generate(**inputs, max_new_tokens=3, do_sample=False), generated)


@pytest.mark.parametrize("model_type", list(SPECS))
def test_the_structural_fallback_finds_the_same_mlp_without_the_registry(model_type):
    from sparsegrad.targets import structural_mlp_targets

    model = build(model_type)
    config = sg.SparseGradConfig(target_modules=structural_mlp_targets(model))
    found = {sg.targets.kind_of(n, config) for n, _ in sg.targets.find_targets(model, config)}
    assert found == SPECS[model_type][2]


def _mixtral():
    config = transformers.MixtralConfig(**dict(MOE, num_local_experts=4, num_hidden_layers=1))
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_expert_gradients_match_autograd_on_the_fused_model(support):
    """Each expert's SparseGrad gradient against the dense reference: autograd of the unconverted fused model."""
    base, batch = _mixtral(), batches("mixtral", 1)[0]
    model = copy.deepcopy(base)
    config = sg.SparseGradConfig(density=0.05, support=support)
    bases = sg.estimate_bases(model, config, [batch], progress=False)
    sg.get_sparsegrad_model(model, config, bases)
    base(**batch).loss.backward()
    model(**batch).loss.backward()
    experts = base.model.layers[0].mlp.experts
    layers = sg.sparsegrad_layers(model)
    for pname in ("gate_up_proj", "down_proj"):
        for e in range(4):
            layer = layers[f"model.layers.0.mlp.experts.{e}.{pname}"]
            dense = getattr(experts, pname).grad[e]
            if support == "dynamic":
                got = layer.weight.grad
                if got is None:  # an expert no token reached gets no gradient at all
                    assert not dense.any()
                    continue
                torch.testing.assert_close(got, dense, rtol=0, atol=0)
            else:
                expected = (layer.u_out.T.double() @ dense.double() @ layer.u_in.double()).reshape(-1)[layer.delta_indices]
                torch.testing.assert_close(layer.delta_values.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_conv1d_gradient_is_the_transposed_dense_gradient():
    base, batch = build("gpt2"), batches("gpt2", 1)[0]
    model = copy.deepcopy(base)
    config = sg.SparseGradConfig(density=0.05)
    sg.get_sparsegrad_model(model, config, sg.estimate_bases(model, config, [batch], progress=False))
    base(**batch).loss.backward()
    model(**batch).loss.backward()
    layer = sg.sparsegrad_layers(model)["transformer.h.1.mlp.c_fc"]
    dense = base.transformer.h[1].mlp.c_fc
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad.T, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=0, atol=0)


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
@pytest.mark.parametrize("model_type", ["gpt2", "mixtral"])
def test_basis_refresh_on_conv1d_and_fused_experts(model_type, support, tmp_path):
    """Recalibrating a converted GPT-2 / Mixtral (its layers' dense gradients) and folding keeps adapters exact."""
    model = build(model_type)
    config = sg.SparseGradConfig(density=0.05, support=support)
    sg.get_sparsegrad_model(model, config, sg.estimate_bases(model, config, batches(model_type, 1), progress=False))
    opt = sg.create_optimizer(model, lr=1e-2)
    steps = batches(model_type, 3, seed=1)
    for i, batch in enumerate(steps):
        if i == 2:
            assert sg.refresh_bases(model, sg.estimate_bases(model, config, steps[2:], progress=False), opt) == \
                SPECS[model_type][3]
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    sg.save_adapter(model, tmp_path / "a")
    probe = batches(model_type, 1, seed=9)[0]
    reloaded = sg.load_adapter(build(model_type), tmp_path / "a")
    torch.testing.assert_close(logits(reloaded, probe), logits(model, probe), rtol=0, atol=0)


def _preflight():
    from sparsegrad.finetune import preflight

    return preflight


@pytest.mark.parametrize("model_type", sorted(set(SPECS) & set(_preflight().MLP_DIM_KEYS)))
def test_the_preflight_shape_table_agrees_with_the_matrices_the_registry_converts(model_type):
    """`finetune.preflight` reads (hidden, inner) from config.json without torch, to check --k and --lora-rank
    before any model loads; the registry finds the matrices on the loaded model. The two must name one shape."""
    model = build(model_type)
    hidden, inner = _preflight().mlp_shape(model.config.to_dict())
    found = {tuple(module.weight.shape) for _, module in sg.targets.find_targets(model, sg.SparseGradConfig())}
    assert found <= {(hidden, inner), (inner, hidden)} and found, (model_type, found, hidden, inner)


@pytest.mark.parametrize("model_type", sorted(_preflight().MLP_DIM_KEYS))
def test_every_family_of_the_preflight_table_has_its_keys_in_its_default_config(model_type):
    """Families the matrix above does not build: their config.json keys exist under the names the table gives."""
    config = transformers.AutoConfig.for_model(model_type).to_dict()
    keys = _preflight().MLP_DIM_KEYS[model_type]
    assert all(key in config for key in keys), (model_type, keys)
    assert _preflight().mlp_shape(config) is not None
