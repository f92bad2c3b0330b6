"""Basis refresh (`sg.refresh_bases`): the function is kept, training continues in the new basis (checked against
autograd on the unrotated layer), and adapters with folded segments reload bit for bit."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsegrad as sg
from helpers import bert_batches, make_tiny_bert
from test_model import converted_bert

NAME = "bert.encoder.layer.0.intermediate.dense"


def train_steps(model, opt, batches):
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def refreshed_model(support, refreshes=2, seed=0):
    """Train 2 steps, then `refreshes` times: recalibrate on the converted model, refresh, train 2 steps."""
    model = converted_bert(support, seed=seed)
    opt = sg.create_optimizer(model, lr=1e-2)
    train_steps(model, opt, bert_batches(2, seed=1))
    for r in range(refreshes):
        config = getattr(model, "sparsegrad_config")
        bases = sg.estimate_bases(model, config, bert_batches(2, seed=20 + r), progress=False)
        assert sg.refresh_bases(model, bases, opt) == 4
        train_steps(model, opt, bert_batches(2, seed=30 + r))
    return model, opt


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_refresh_keeps_the_function_and_resets_the_layer(support):
    model = converted_bert(support)
    opt = sg.create_optimizer(model, lr=1e-2)
    train_steps(model, opt, bert_batches(2, seed=1))
    layer = sg.sparsegrad_layers(model)[NAME]
    batch = bert_batches(1, seed=5)[0]
    before = model(**batch).logits.detach()
    weight = layer.weight.detach().clone()
    old_u_out = layer.u_out.clone()
    trained = (layer.delta_indices.clone(), layer.delta_values.detach().clone())
    bases = sg.estimate_bases(model, model.sparsegrad_config, bert_batches(2, seed=7), progress=False)
    sg.refresh_bases(model, bases, opt)
    # the function is unchanged: the delta moved into the frozen weight, bit for bit
    assert torch.equal(layer.base_weight, weight) and torch.equal(layer.weight, weight)
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)
    # the layer continues from an empty delta in the new bases; the old segment is recorded
    assert torch.equal(layer.u_out.cpu(), bases.get(layer.kind)[0]) and not torch.equal(layer.u_out, old_u_out)
    if support == "fixed":  # the new support comes with the new bases (chosen by their scoring pass)
        assert torch.equal(layer.delta_indices.long().cpu(), bases.fixed_supports[NAME].sort().values)
        assert not bool(layer.delta_values.any())
    else:
        assert layer.delta_indices.numel() == 0
    assert len(layer.folded) == 1 and torch.equal(layer.folded[0]["indices"], trained[0].cpu())
    torch.testing.assert_close(layer.folded[0]["values"], trained[1].float().cpu(), rtol=0, atol=0)
    assert (layer.weight if support == "dynamic" else layer.delta_values) not in opt.state  # old-basis moments gone


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_gradient_after_refresh_matches_autograd_in_the_new_basis(support):
    model, _ = refreshed_model(support, refreshes=1)
    layer = sg.sparsegrad_layers(model)[NAME]
    x = torch.randn(5, 32)
    gy = torch.randn(5, 64)
    ref = torch.nn.Linear(32, 64)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
    ref(x).backward(gy)
    layer.zero_grad(set_to_none=True)
    layer(x).backward(gy)
    rotated_ref = layer.u_out.T @ ref.weight.grad @ layer.u_in
    if support == "dynamic":
        torch.testing.assert_close(layer.rotate(layer.weight.grad), rotated_ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(layer.delta_values.grad, rotated_ref.flatten()[layer.delta_indices.long()],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_adapter_with_folded_segments_reloads_bit_for_bit(tmp_path, support):
    model, _ = refreshed_model(support, refreshes=2)
    batch = bert_batches(1, seed=3)[0]
    expected = model(**batch).logits.detach()
    path = sg.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["version"] == 2 and meta["folded_segments"] == 2
    tensors = load_file(path / "adapter_model.safetensors")
    assert f"folded/1/{NAME}.delta_indices" in tensors and "folded/0/bases/u_out/bert.encoder.layer.*.intermediate.dense" in tensors
    loaded = sg.load_adapter(make_tiny_bert(), path)
    for name, layer in sg.sparsegrad_layers(model).items():
        assert torch.equal(sg.sparsegrad_layers(loaded)[name].weight, layer.weight), name
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    # the loaded model can be saved again (same pretrained fingerprint) and merged to plain Linear
    again = sg.save_adapter(loaded, tmp_path / "again")
    assert json.loads((again / "adapter_config.json").read_text())["base_fingerprint"] == meta["base_fingerprint"]
    merged = sg.merge_and_unload(loaded)
    torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=0)
    # without the live bases in the file: the folded segments' bases are still saved, the live ones passed in
    slim = sg.save_adapter(model, tmp_path / "slim", save_bases=False)
    assert not any(k.startswith("bases/") for k in load_file(slim / "adapter_model.safetensors"))
    live = sg.SparseGradBases(factors={l.kind: (l.u_out.cpu(), l.u_in.cpu())
                                       for l in sg.sparsegrad_layers(model).values()})
    torch.testing.assert_close(sg.load_adapter(make_tiny_bert(), slim, bases=live)(**batch).logits, expected,
                               rtol=0, atol=0)


def test_adapter_without_refresh_stays_version_1(tmp_path):
    model = converted_bert()
    train_steps(model, sg.create_optimizer(model, lr=1e-2), bert_batches(2, seed=1))
    meta = json.loads((sg.save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert meta["version"] == 1 and meta["folded_segments"] == 0


@pytest.fixture(scope="module")
def refreshed_adapter(tmp_path_factory):
    model, _ = refreshed_model("dynamic", refreshes=2)
    return sg.save_adapter(model, tmp_path_factory.mktemp("refreshed") / "adapter")


@pytest.mark.parametrize("corrupt,msg", [
    (lambda t, m: t.pop(f"folded/1/{NAME}.delta_values"), "lacks the delta of folded segment 1"),
    (lambda t, m: t[f"folded/0/{NAME}.delta_values"].__setitem__(0, float("nan")), "hold NaN or inf"),
    (lambda t, m: t.pop("folded/0/bases/u_in/bert.encoder.layer.*.intermediate.dense"), "lacks the u_in basis"),
    (lambda t, m: t["folded/1/bases/u_out/bert.encoder.layer.*.output.dense"].fill_(float("inf")), "holds NaN or inf"),
    (lambda t, m: m.__setitem__("folded_segments", 3), "lacks the delta of folded segment 2"),
    (lambda t, m: m.__setitem__("folded_segments", -1), "folded_segments=-1"),
    (lambda t, m: m.__setitem__("version", 1), "version-1 adapter cannot hold folded segments"),
])
def test_damaged_folded_segments_are_refused(tmp_path, refreshed_adapter, corrupt, msg):
    import shutil

    from safetensors.torch import save as st_save

    from sparsegrad.io import sha256_bytes

    path = Path(shutil.copytree(refreshed_adapter, tmp_path / "a"))
    tensors = load_file(path / "adapter_model.safetensors")
    meta = json.loads((path / "adapter_config.json").read_text())
    corrupt(tensors, meta)
    blob = st_save(tensors)
    (path / "adapter_model.safetensors").write_bytes(blob)
    meta["weights_sha256"] = sha256_bytes(blob)
    (path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=msg.replace("*", r"\*")):
        sg.load_adapter(make_tiny_bert(), path)


def test_refresh_errors():
    with pytest.raises(ValueError, match="converted with sg.get_sparsegrad_model"):
        sg.refresh_bases(make_tiny_bert(), sg.SparseGradBases(factors={}))
    model = converted_bert()
    meprop = sg.identity_bases(make_tiny_bert(), model.sparsegrad_config)
    with pytest.raises(ValueError, match="calibrated"):
        sg.refresh_bases(model, meprop)
    layer = sg.sparsegrad_layers(model)[NAME]
    with pytest.raises(ValueError, match="do not fit"):
        layer.fold(torch.eye(3), torch.eye(3))
    layer.fold(layer.u_out.clone(), layer.u_in.clone())  # one layer refreshed by hand, not the model
    with pytest.raises(ValueError, match=r"refreshed different numbers of times \(\[0, 1\]\)"):
        sg.save_adapter(model, "unused")


def test_trainer_restore_refuses_refreshed_adapters(refreshed_adapter):
    from sparsegrad.finetune.trainer import restore_adapter

    with pytest.raises(ValueError, match="holds 2 basis refresh"):
        restore_adapter(converted_bert(), refreshed_adapter)
