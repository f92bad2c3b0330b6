"""Model wrapping: conversion, counts, merge, no global state."""

import copy

import pytest
import torch
from torch import nn

import sparsegrad as sg
from conftest import bert_batches, llama_batches, make_tiny_bert, make_tiny_llama


def converted_bert(support="dynamic", seed=0, density=0.05):
    model = make_tiny_bert(seed)
    cfg = sg.SparseGradConfig(density=density, support=support)
    bases = sg.estimate_bases(model, cfg, bert_batches(3, seed=seed), progress=False)
    return sg.get_sparsegrad_model(model, cfg, bases)


def train(model, steps=3, seed=1, lr=1e-2):
    opt = sg.create_optimizer(model, lr=lr)
    for batch in bert_batches(steps, seed=seed):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_conversion_is_exact_on_a_model_and_merge_restores_the_architecture(support):
    base = make_tiny_bert()
    model = converted_bert(support)
    layers = sg.sparsegrad_layers(model)
    assert sorted(layers) == sorted(n for n, m in base.named_modules()
                                    if n.endswith(("intermediate.dense", "output.dense")) and "attention" not in n)
    batch = bert_batches(1, seed=9)[0]
    torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)
    train(model)
    trained = model(**batch).logits.detach()
    assert not torch.allclose(trained, base(**batch).logits)
    merged = sg.merge_and_unload(model)
    assert not sg.sparsegrad_layers(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n in layers)
    assert list(merged.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(merged(**batch).logits, trained, rtol=0, atol=0)


def test_two_models_side_by_side_and_deepcopy():
    a, b = converted_bert(seed=0), converted_bert(seed=1)
    la, lb = sg.sparsegrad_layers(a), sg.sparsegrad_layers(b)
    name = next(iter(la))
    assert not torch.equal(la[name].u_out, lb[name].u_out)  # no class-level bases
    # blocks of one kind share one copy of the bases
    kinds = {}
    for layer in la.values():
        kinds.setdefault(layer.kind, layer.u_out)
        assert layer.u_out is kinds[layer.kind]
    train(a)
    batch = bert_batches(1, seed=4)[0]
    clone = copy.deepcopy(a)
    torch.testing.assert_close(clone(**batch).logits, a(**batch).logits, rtol=0, atol=0)
    # the copy keeps training like the original
    train(a, seed=7)
    train(clone, seed=7)
    torch.testing.assert_close(clone(**batch).logits, a(**batch).logits, rtol=0, atol=0)


def test_state_dict_round_trip_onto_a_fresh_conversion():
    a = converted_bert()
    train(a)
    b = converted_bert()
    b.load_state_dict(a.state_dict())
    batch = bert_batches(1, seed=4)[0]
    torch.testing.assert_close(b(**batch).logits, a(**batch).logits, rtol=0, atol=0)


def test_counts_and_print(capsys):
    model = converted_bert()
    cfg = model.sparsegrad_config
    line = sg.print_trainable_parameters(model)
    assert line in capsys.readouterr().out
    trainable, total = sg.count_parameters(model)
    assert total == sum(p.numel() for p in make_tiny_bert().parameters())
    k = cfg.budget(64, 32)
    dense = sum(p.numel() for n, p in model.named_parameters()
                if p.requires_grad and not n.endswith(("intermediate.dense.weight", "output.dense.weight"))
                or (p.requires_grad and "attention" in n and n.endswith("weight")))
    assert trainable == dense + 4 * k
    assert line.startswith("trainable params: ") and "|| all params: " in line and "|| trainable%: " in line


def test_layers_to_transform_and_llama_kinds():
    model = make_tiny_llama(layers=3)
    cfg = sg.SparseGradConfig(target_modules=sg.LLAMA_MLP_TARGETS, density=0.05, layers_to_transform=[0, 2])
    bases = sg.estimate_bases(model, cfg, llama_batches(2), progress=False)
    sg.get_sparsegrad_model(model, cfg, bases)
    names = sorted(sg.sparsegrad_layers(model))
    assert names == sorted(f"model.layers.{i}.mlp.{p}" for i in (0, 2) for p in ("gate_proj", "up_proj", "down_proj"))
    assert {l.kind for l in sg.sparsegrad_layers(model).values()} == {
        f"model.layers.*.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def test_conversion_errors():
    model = make_tiny_bert()
    cfg = sg.SparseGradConfig(density=0.05)
    bases = sg.estimate_bases(model, cfg, bert_batches(2), progress=False)
    with pytest.raises(ValueError, match="SparseGradBases"):
        sg.get_sparsegrad_model(model, cfg, {"a": 1})
    other = make_tiny_bert()
    small = sg.SparseGradBases(factors={k: (torch.eye(3), torch.eye(3)) for k in bases.factors})
    with pytest.raises(ValueError, match="calibrated on another model"):
        sg.get_sparsegrad_model(other, cfg, small)
    with pytest.raises(ValueError, match="no factors for kind"):
        sg.get_sparsegrad_model(other, cfg, sg.SparseGradBases(factors={}))
    sg.get_sparsegrad_model(model, cfg, bases)
    with pytest.raises(ValueError, match="already converted"):
        sg.get_sparsegrad_model(model, cfg, bases)
    with pytest.raises(ValueError, match="no SparseGradLinear"):
        sg.merge_and_unload(make_tiny_bert())


@pytest.mark.parametrize("kwargs,msg", [
    ({"k": 0}, "positive integer"), ({"k": -3}, "positive integer"), ({"density": 0.0}, r"\(0, 1\]"),
    ({"density": 1.5}, r"\(0, 1\]"), ({"support": "sometimes"}, "support"), ({"target_modules": ""}, "empty"),
    ({"target_modules": "(["}, "not a valid regex"), ({"basis_sharing": "model"}, "basis_sharing"),
    ({"calibration_dtype": "float16"}, "calibration_dtype"), ({"k": None, "density": None}, "budget"),
    ({"layers_to_transform": [-1]}, "layers_to_transform"), ({"target_modules": 3}, "regex string"),
])
def test_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        sg.SparseGradConfig(**kwargs)


def test_config_budget_and_round_trip():
    cfg = sg.SparseGradConfig(density=0.01)
    assert cfg.budget(1536, 384) == round(0.01 * 1536 * 384)
    assert sg.SparseGradConfig(k=77).budget(10, 10) == 77
    with pytest.raises(ValueError, match="exceeds"):
        sg.SparseGradConfig(k=101).budget(10, 10, name="tiny")
    assert sg.SparseGradConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SparseGradConfig fields"):
        sg.SparseGradConfig.from_dict({"rank": 3})
