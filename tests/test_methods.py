"""prepare_method: what trains in each method x scope, LoRA rank matching, MeProp = identity bases, fair budgets."""

import re

import pytest
import torch
from helpers import bert_batches, make_tiny_bert, make_tiny_llama

import sparsegrad as sg
from sparsegrad.finetune.methods import (
    DEFAULT_LR,
    METHODS,
    SCOPES,
    default_lr,
    default_targets,
    lora_modules,
    lora_rank_for_budget,
    lr_help,
    prepare_method,
)

TARGET = re.compile(sg.BERT_MLP_TARGETS)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _strip(name):
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _prepare(method, scope="mlp", **kw):
    model = make_tiny_bert().train()
    kw.setdefault("density", 0.05)
    calib = bert_batches(2) if method == "sparsegrad" else None
    return prepare_method(model, method, train_scope=scope, calibration_batches=calib, **kw)


def _is_mlp_module_param(name, leaf):
    module, _, last = _strip(name).rpartition(".")
    return TARGET.fullmatch(module) is not None and last == leaf


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scope", SCOPES)
def test_what_trains_matches_scope(method, scope):
    prep = _prepare(method, scope)
    names = {_strip(n) for n in _trainable(prep.model)}
    all_names = {_strip(n) for n, _ in prep.model.named_parameters()}
    heads = {n for n in all_names if n.startswith("classifier.")}
    biases = {n for n in all_names if _is_mlp_module_param(n, "bias")}
    assert heads and heads <= names and biases <= names
    if method == "full":
        mlp = {n for n in all_names if _is_mlp_module_param(n, "weight")}
    elif method == "lora":
        mlp = {n for n in all_names if ".lora_" in n}
        assert not any(_is_mlp_module_param(n, "weight") for n in names)  # frozen base weights
    elif method == "sparsegrad" or method == "meprop":
        mlp = {n for n in all_names if _is_mlp_module_param(n, "weight")}  # dynamic: dense grad, sparse step
        assert not any(n.endswith("base_weight") for n in names)
    assert mlp and mlp <= names
    others = all_names - heads - biases - mlp
    others -= {n for n in all_names if _is_mlp_module_param(n, "weight")}  # frozen MLP base weights (lora)
    others -= {n for n in all_names if n.endswith(".delta_values")}
    if scope == "mlp":
        assert names == heads | biases | mlp
        assert not (names & others)
    else:
        assert others and others <= names  # embeddings, attention, LayerNorm, pooler all train
        assert any("LayerNorm" in n for n in names) and any("embeddings" in n for n in names)


def test_fixed_support_trains_delta_values_only():
    prep = _prepare("sparsegrad", "mlp", support="fixed")
    names = _trainable(prep.model)
    for name, layer in sg.sparsegrad_layers(prep.model).items():
        assert f"{name}.delta_values" in names and f"{name}.weight" not in names
        assert layer.delta_indices.numel() == layer.k  # chosen from the calibration gradients


@pytest.mark.parametrize("method", METHODS)
def test_scope_mlp_freezing_survives_a_training_step(method):
    prep = _prepare(method, "mlp")
    model = prep.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("base_weight")}
    opt = sg.create_optimizer(model, lr=1e-2)
    for batch in bert_batches(2, seed=5):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {_strip(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("classifier.") for n in changed)
    assert not any("embeddings" in n or "attention" in n or "LayerNorm" in n for n in changed)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers() if n in buffers)


def test_lora_rank_matches_budget_and_wraps_only_mlp():
    # tiny BERT MLP: 64x32 and 32x64, in + out = 96; k = 300 -> r = round(300 / 96) = 3
    prep = _prepare("lora", budget_k=300)
    assert prep.lora_rank == 3 and prep.lora_alpha == 3.0
    assert all(v == 3 * 96 for v in prep.k_per_matrix.values())
    assert abs(prep.lora_rank * 96 - 300) <= 96 / 2
    wrapped = set(lora_modules(prep.model))
    assert wrapped == set(prep.target_names)
    assert len(wrapped) == 4
    assert not any("attention" in n for n in wrapped)
    for module in lora_modules(prep.model).values():
        assert module.scaling["default"] == 1.0
    assert "rank 3" in prep.description and "k=300" in prep.description
    assert lora_rank_for_budget(10, 32, 64) == 1  # never below 1


def test_meprop_has_identity_bases():
    prep = _prepare("meprop")
    assert prep.bases.identity and prep.calibration_time_s == 0.0
    for layer in sg.sparsegrad_layers(prep.model).values():
        assert layer.identity_basis
        assert torch.equal(layer.u_out, torch.eye(layer.out_features))
        assert torch.equal(layer.u_in, torch.eye(layer.in_features))
    sparse = _prepare("sparsegrad", score_steps=1)
    assert not sparse.bases.identity and sparse.calibration_time_s > 0
    assert set(sparse.bases_report) and all("energy_topk_rotated" in e for e in sparse.bases_report.values())


@pytest.mark.parametrize("support,score_steps,expected", [("dynamic", None, 0), ("fixed", None, 2),
                                                          ("dynamic", 1, 1), ("fixed", 0, 0)])
def test_score_steps_default_by_support(support, score_steps, expected):
    # A dynamic support only reports from the re-run batches, so by default they are skipped; a fixed one is chosen
    # from them (or, with 0, from the first training step).
    prep = _prepare("sparsegrad", support=support, score_steps=score_steps)
    assert prep.config.score_steps == expected and prep.score_steps == expected
    assert all(("energy_topk_rotated" in e) == (expected > 0) for e in prep.bases_report.values())
    layers = sg.sparsegrad_layers(prep.model).values()
    if support == "fixed":
        assert all(layer.support_pending == (expected == 0) for layer in layers)


def test_trainable_entries_are_fair():
    sparse = _prepare("sparsegrad", budget_k=300)
    meprop = _prepare("meprop", budget_k=300)
    lora = _prepare("lora", budget_k=300)
    full = _prepare("full", budget_k=300)
    assert sparse.k == meprop.k == 300
    assert sparse.trainable_entries == meprop.trainable_entries == sg.count_parameters(sparse.model)[0]
    n_mat = len(sparse.target_names)
    # LoRA's per-matrix parameters are within half a rank step (96 / 2) of k; the rest (biases, head) is identical.
    assert abs(lora.trainable_entries - sparse.trainable_entries) <= n_mat * 96 / 2
    assert full.trainable_entries > sparse.trainable_entries
    assert full.k == 64 * 32


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown method"):
        _prepare("dora")
    with pytest.raises(ValueError, match="unknown train_scope"):
        _prepare("full", "attention")
    with pytest.raises(ValueError, match="calibration_batches"):
        prepare_method(make_tiny_bert(), "sparsegrad")
    with pytest.raises(ValueError, match="head"):
        prepare_method(make_tiny_bert(), "full", head_names=("nohead",))


def test_defaults_and_llama_targets():
    assert set(DEFAULT_LR) == {(kind, m, s) for kind in ("classifier", "causal-lm") for m in METHODS for s in SCOPES}
    help_text = lr_help()  # the --lr help is written from the table: every rate appears in it
    assert all(f"{lr:g}" in help_text for lr in DEFAULT_LR.values())
    assert default_lr("full", "mlp", "causal-lm") == DEFAULT_LR[("causal-lm", "full", "mlp")]
    with pytest.raises(ValueError, match="no default learning rate"):
        default_lr("shira")
    llama = make_tiny_llama()
    assert default_targets(llama) == sg.LLAMA_MLP_TARGETS
    prep = prepare_method(llama, "lora", train_scope="mlp", density=0.05, head_names=("lm_head",))
    assert len(lora_modules(prep.model)) == 6  # gate, up, down x 2 layers
    assert default_targets(make_tiny_bert()) == sg.BERT_MLP_TARGETS
