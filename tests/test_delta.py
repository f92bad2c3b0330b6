"""sparsegrad.delta.restore_delta: the one way a trained state goes back into a converted model (adapter load,
resume, best step, HF Trainer resume). The reference is the trained model itself: a fresh conversion of the same
base with its state restored computes the same logits, bit for bit; every refusal leaves the model untouched."""

import re

import pytest
import torch

import sparsegrad as sg
from conftest import bert_batches, make_tiny_bert
from sparsegrad.delta import restore_delta
from test_model import converted_bert, train

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = "bert.encoder.layer.0.intermediate.dense"


def trained_state(model):
    """Each layer's delta and every other trained parameter, by name (what adapters and checkpoints save)."""
    layers = sg.sparsegrad_layers(model)
    dense = {id(layer.weight) for layer in layers.values()}
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and id(p) not in dense}
    for name, layer in layers.items():
        state[f"{name}.delta_indices"] = layer.delta_indices.clone()
        state[f"{name}.delta_values"] = layer.delta_values.detach().clone()
    return state


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**bert_batches(1, seed=3)[0]).logits


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_restore_reproduces_the_trained_model_exactly(support):
    model = converted_bert(support)
    train(model, steps=3)
    fresh = converted_bert(support)  # the same base and bases, untrained
    assert not torch.equal(logits(fresh), logits(model))
    restore_delta(fresh, {k: v.clone() for k, v in trained_state(model).items()}, "test")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


def test_restore_with_bases_replaces_the_bases_of_another_conversion():
    model = converted_bert()
    train(model, steps=3)
    cfg = sg.SparseGradConfig(density=0.05)
    other = sg.estimate_bases(make_tiny_bert(0), cfg, bert_batches(3, seed=7), progress=False)
    fresh = sg.get_sparsegrad_model(make_tiny_bert(0), cfg, other, keep_requires_grad=True)
    bases = {layer.kind: (layer.u_out, layer.u_in) for layer in sg.sparsegrad_layers(model).values()}
    restore_delta(fresh, trained_state(model), "test", bases=bases)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    layers = list(sg.sparsegrad_layers(fresh).values())
    same_kind = [l for l in layers if l.kind == layers[0].kind]
    assert len(same_kind) > 1 and all(l.u_out is same_kind[0].u_out for l in same_kind)  # shared per kind


def _set(key, value):
    return lambda t: t.__setitem__(key, value(t))


REFUSALS = [  # (change to the saved state, message)
    (lambda t: t.pop(f"{LAYER}.delta_values"), f"test lacks the delta of {LAYER}"),
    (_set(f"{LAYER}.delta_indices", lambda t: t[f"{LAYER}.delta_indices"].float()), "must be int32 or int64"),
    (_set(f"{LAYER}.delta_indices", lambda t: t[f"{LAYER}.delta_indices"].flip(0)), "not strictly increasing"),
    (_set(f"{LAYER}.delta_indices", lambda t: t[f"{LAYER}.delta_indices"] + 10**6), "fall outside its 64x32"),
    (_set(f"{LAYER}.delta_values", lambda t: t[f"{LAYER}.delta_values"] * float("nan")), "hold NaN or inf"),
    (_set("bert.embeddings.word_embeddings.weight.extra", lambda t: torch.zeros(1)), "holds tensors the model lacks"),
    (_set("classifier.weight", lambda t: torch.zeros(1, 1)), "classifier.weight is (1, 1), the model has"),
    (_set("classifier.weight", lambda t: t["classifier.weight"].int()), "classifier.weight is torch.int32"),
    (_set("classifier.bias", lambda t: t["classifier.bias"] + float("inf")), "['classifier.bias'] hold NaN or inf"),
]


@pytest.mark.parametrize("change,msg", REFUSALS, ids=[m for _, m in REFUSALS])
def test_refusals_name_the_tensor_and_change_nothing(change, msg):
    model = converted_bert()
    train(model, steps=2)
    state = trained_state(model)
    change(state)
    fresh = converted_bert()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(msg)):
        restore_delta(fresh, state, "test")
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_fixed_support_needs_k_entries_or_none():
    state = trained_state(converted_bert("fixed"))
    k = state[f"{LAYER}.delta_values"].numel()
    pending = {**state, f"{LAYER}.delta_indices": torch.empty(0, dtype=torch.int32),
               f"{LAYER}.delta_values": torch.empty(0)}  # as an adapter saved before the support was chosen
    fresh = restore_delta(converted_bert("fixed"), pending, "test")
    layer = sg.sparsegrad_layers(fresh)[LAYER]
    assert layer.support_pending and torch.equal(layer.delta_values.detach(), torch.zeros(k))
    short = {**state, f"{LAYER}.delta_indices": state[f"{LAYER}.delta_indices"][:-1],
             f"{LAYER}.delta_values": state[f"{LAYER}.delta_values"][:-1]}
    with pytest.raises(ValueError, match=f"the delta of {LAYER} has {k - 1} entries, its fixed support needs {k}"):
        restore_delta(converted_bert("fixed"), short, "test")
