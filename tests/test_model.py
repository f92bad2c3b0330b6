"""Model wrapping: conversion, counts, merge, no global state."""

import copy

import pytest
import torch
from torch import nn

import sparsegrad as sg
from conftest import bert_batches, llama_batches, make_tiny_bert, make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def converted_bert(support="dynamic", seed=0, density=0.05, keep_requires_grad=True):
    """A tiny BERT converted on its MLP; by default every other parameter still trains (as the adapter and refresh
    tests need: extra trained parameters); ``keep_requires_grad=False`` is PEFT's default, only the adapter."""
    model = make_tiny_bert(seed)
    cfg = sg.SparseGradConfig(density=density, support=support)
    bases = sg.estimate_bases(model, cfg, bert_batches(3, seed=seed), progress=False)
    return sg.get_sparsegrad_model(model, cfg, bases, keep_requires_grad=keep_requires_grad)


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


def test_default_trains_only_the_adapter_the_mlp_biases_and_the_head(capsys, tmp_path):
    model = converted_bert(keep_requires_grad=False)
    layers = sg.sparsegrad_layers(model)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {f"{n}.{p}" for n in layers for p in ("weight", "bias")} | {"classifier.weight",
                                                                                  "classifier.bias"}
    k = model.sparsegrad_config.budget(64, 32)
    trainable, _ = sg.count_parameters(model)
    assert trainable == 4 * k + 2 * (64 + 32) + (32 * 3 + 3)
    sg.print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert f"sparsegrad bert.encoder.layer.*.intermediate.dense: 2 modules, k={k}" in out
    assert "dense: classifier (99 params)" in out and "biases of the converted modules (192 params)" in out
    opt = sg.create_optimizer(model, lr=1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trains)
    train(model)
    sg.save_adapter(model, tmp_path / "a")
    meta = sg.read_adapter(tmp_path / "a")[0]
    assert set(meta["trainable_params"]) == {"classifier.weight", "classifier.bias"} | {
        f"{n}.bias" for n in layers}


def test_modules_to_save_replaces_the_default_head():
    model = make_tiny_bert()
    cfg = sg.SparseGradConfig(density=0.05, support="fixed", modules_to_save=["pooler"])
    sg.get_sparsegrad_model(model, cfg, sg.identity_bases(model, cfg))
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= trains
    assert not any(n.startswith("classifier") for n in trains)
    assert not any(n.endswith(".weight") and "pooler" not in n for n in trains)  # fixed: the deltas train
    with pytest.raises(ValueError, match="modules_to_save names 'heads'"):
        bad = sg.SparseGradConfig(modules_to_save=["heads"])
        sg.get_sparsegrad_model(make_tiny_bert(), bad, sg.identity_bases(make_tiny_bert(), bad))


class _Block(nn.Module):
    def __init__(self, hidden=8, inter=20):
        super().__init__()
        self.attn = nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, inter), nn.Linear(inter, hidden)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.down(torch.relu(self.up(x)))


class _Net(nn.Module):
    def __init__(self, block=_Block):
        super().__init__()
        self.blocks = nn.ModuleList([block(), block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_unknown_model_type_falls_back_to_the_mlp_shape_and_no_mlp_is_one_clear_error():
    net = _Net()
    assert sg.mlp_target_modules(net) == r"blocks\.\d+\.down|blocks\.\d+\.up"
    cfg = sg.SparseGradConfig(k=3)
    sg.get_sparsegrad_model(net, cfg, sg.identity_bases(net, cfg))
    assert sorted(sg.sparsegrad_layers(net)) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    flat.config = type("Cfg", (), {"model_type": "mystery"})()
    with pytest.raises(ValueError, match=r"found no MLP block in the model_type 'mystery': pass target_modules"):
        sg.get_sparsegrad_model(flat, sg.SparseGradConfig(), sg.SparseGradBases(factors={}))


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _TaggedLinear(nn.Linear):
    """A subclass that keeps nn.Linear.forward."""


def test_linear_subclasses_convert_and_merge_back_to_their_class_unless_they_have_their_own_forward():
    class Tagged(_Block):
        def __init__(self):
            super().__init__()
            self.up, self.down = _TaggedLinear(8, 20), _TaggedLinear(20, 8)

    torch.manual_seed(0)
    net, x = _Net(Tagged), torch.randn(3, 8)
    expected = net(x)
    cfg = sg.SparseGradConfig(target_modules=r"blocks\.\d+\.(up|down)", k=5)
    sg.get_sparsegrad_model(net, cfg, sg.identity_bases(net, cfg))
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    merged = sg.merge_and_unload(net)
    assert type(merged.blocks[0].up) is _TaggedLinear
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=0)
    net = _Net()
    net.blocks[1].up = _ScaledLinear(8, 20)
    with pytest.raises(ValueError, match="blocks.1.up, a _ScaledLinear: an nn.Linear subclass with its own forward"):
        sg.identity_bases(net, cfg)


def test_falcon_linear_with_a_bias_converts_exactly():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    base = FalconForCausalLM(FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          vocab_size=50, bias=True)).eval()
    for p in base.parameters():
        p.data.normal_()  # non-zero biases, large activations: rounding differences would show
    model = copy.deepcopy(base)
    cfg = sg.SparseGradConfig(k=40)
    sg.get_sparsegrad_model(model, cfg, sg.identity_bases(model, cfg))
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    assert type(sg.merge_and_unload(model).transformer.h[0].mlp.dense_h_to_4h).__name__ == "FalconLinear"


def test_calibrating_fused_experts_gives_the_model_back_its_own_parameters():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                             num_local_experts=3, num_experts_per_tok=2)).eval()
    experts = model.model.layers[0].mlp.experts
    params = dict(experts.named_parameters())
    ids = torch.randint(0, 40, (2, 6))
    bases = sg.estimate_bases(model, sg.SparseGradConfig(k=8), [{"input_ids": ids, "labels": ids}], progress=False)
    assert sorted(bases.kinds()) == ["model.layers.*.mlp.experts.*.down_proj", "model.layers.*.mlp.experts.*.gate_up_proj"]
    assert all(p is params[n] for n, p in experts.named_parameters()) and list(params) == ["gate_up_proj", "down_proj"]
    assert [n for n, _ in experts.named_children()] == ["act_fn"] and not experts._forward_pre_hooks
    assert all(p.grad is None for p in params.values())


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_the_optimizer_refuses_to_step_after_merge_and_unload(support):
    # The review's case 203: stepping the old optimizer after the merge was silently accepted (and would move
    # the biases the merged model shares with the old layers).
    model = converted_bert(support)
    opt = train(model, steps=1)
    batch = bert_batches(1, seed=4)[0]
    model(**batch).loss.backward()  # gradients pending when the user merges
    merged = sg.merge_and_unload(model)
    before = copy.deepcopy(merged.state_dict())
    with pytest.raises(ValueError, match="merged into the model by merge_and_unload"):
        opt.step()
    after = merged.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
