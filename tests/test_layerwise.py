"""The layer-wise step: the same weights as the ordinary step, each dense gradient freed before the next exists,
and one clear refusal of what it cannot do."""

import copy

import pytest
import torch

import sparsegrad as sg
from conftest import bert_batches
from sparsegrad.layerwise import LayerwiseStepError, enable_layerwise_step
from sparsegrad.optim import EXACT_REBUILD_EVERY

pytestmark = pytest.mark.usefixtures("one_thread")


def converted(tiny_bert, identity: bool):
    cfg = sg.SparseGradConfig(density=0.05)
    bases = sg.identity_bases(tiny_bert, cfg) if identity else sg.estimate_bases(tiny_bert, cfg, bert_batches(2),
                                                                               progress=False)
    return sg.get_sparsegrad_model(tiny_bert, cfg, bases)


def train(model, opt, batches, sched=None):
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("identity", [False, True])
def test_layerwise_weights_equal_the_ordinary_step(tiny_bert, identity):
    ordinary_model = converted(tiny_bert, identity)
    layerwise_model = copy.deepcopy(ordinary_model)
    ordinary = sg.create_optimizer(ordinary_model, lr=3e-3, weight_decay=0.01)
    layerwise = sg.create_optimizer(layerwise_model, lr=3e-3, weight_decay=0.01, layerwise=True)
    dynamic = [m.weight for m in sg.sparsegrad_layers(layerwise_model).values()]
    alive = []  # at each layer's hook (fired before the layer-wise one): how many dense gradients exist
    for w in dynamic:
        w.register_post_accumulate_grad_hook(lambda _: alive.append(sum(p.grad is not None for p in dynamic)))
    layerwise.layerwise.remove()  # this test's hooks first, then the layer-wise ones again
    layerwise.layerwise = enable_layerwise_step(layerwise)
    batches = bert_batches(EXACT_REBUILD_EVERY + 4, seed=5)  # past an exact rebuild
    decay = lambda s: 1 - s / 40  # noqa: E731
    train(ordinary_model, ordinary, batches, torch.optim.lr_scheduler.LambdaLR(ordinary, decay))
    sched = torch.optim.lr_scheduler.LambdaLR(layerwise, decay)
    layerwise_model(**batches[0]).loss.backward()
    assert all(w.grad is None for w in dynamic)  # stepped and freed inside the backward
    assert alive and set(alive) == {1}  # never two dense gradients at once
    layerwise.step()
    sched.step()
    layerwise.zero_grad(set_to_none=True)
    train(layerwise_model, layerwise, batches[1:], sched)
    # Bit for bit: the same arithmetic per layer, only its order across layers differs.
    for (name, a), (_, b) in zip(ordinary_model.state_dict().items(), layerwise_model.state_dict().items()):
        assert torch.equal(a, b), name
    for layer_a, layer_b in zip(sg.sparsegrad_layers(ordinary_model).values(),
                                sg.sparsegrad_layers(layerwise_model).values()):
        assert torch.equal(layer_a.weight, layer_b.weight)
        assert layer_a.delta_indices.numel() > layer_a.k  # the support grew: real training happened
    state_a, state_b = ordinary.state_dict()["state"], layerwise.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for key, value in state_a[i].items():
            assert torch.equal(value, state_b[i][key]), (i, key)


def test_layerwise_leaves_a_nonfinite_gradient_for_step_to_refuse(tiny_bert):
    model = converted(tiny_bert, identity=False)
    opt = sg.create_optimizer(model, lr=1e-3, layerwise=True)
    layers = list(sg.sparsegrad_layers(model).values())
    before = [layer.weight.detach().clone() for layer in layers]
    (model(**bert_batches(1)[0]).loss * float("nan")).backward()
    assert all(layer.weight.grad is not None for layer in layers)  # not stepped, left for the check
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(b, layer.weight) for b, layer in zip(before, layers))


def test_paused_layerwise_accumulates_like_the_ordinary_step(tiny_bert):
    model = converted(tiny_bert, identity=False)
    opt = sg.create_optimizer(model, lr=1e-3, layerwise=True)
    layers = list(sg.sparsegrad_layers(model).values())
    with opt.layerwise.paused():
        model(**bert_batches(1)[0]).loss.backward()
    assert all(layer.weight.grad is not None for layer in layers)
    opt.step()  # the ordinary step takes them
    assert all(layer.delta_indices.numel() == layer.k for layer in layers)


def test_layerwise_refusals(tiny_bert, monkeypatch):
    model = converted(tiny_bert, identity=False)
    opt = sg.create_optimizer(model, lr=1e-3)
    with pytest.raises(LayerwiseStepError, match="grad_accum 1, got 4"):
        enable_layerwise_step(opt, grad_accum=4)
    with pytest.raises(LayerwiseStepError, match="gradient clipping"):
        enable_layerwise_step(opt, max_grad_norm=1.0)
    with pytest.raises(LayerwiseStepError, match="needs a SparseGradAdamW, got AdamW"):
        enable_layerwise_step(torch.optim.AdamW(model.parameters()))
    monkeypatch.setattr("sparsegrad.layerwise._distributed", lambda: True)
    with pytest.raises(LayerwiseStepError, match="data parallelism"):
        enable_layerwise_step(opt)
    monkeypatch.undo()
    handle = enable_layerwise_step(opt)
    monkeypatch.setattr("sparsegrad.layerwise._distributed", lambda: True)  # a process group started afterwards
    with pytest.raises(LayerwiseStepError, match="data parallelism"):
        model(**bert_batches(1)[0]).loss.backward()
    handle.remove()


# ------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny BERT folder without dropout and a training file."""
    from helpers import CLASSIFIER, task_data, tiny_model_dir

    root = tmp_path_factory.mktemp("layerwise")
    return tiny_model_dir(CLASSIFIER, root / "model", dropout=0.0), task_data(CLASSIFIER, root)


def test_cli_layerwise_step_trains_the_same_adapter(tmp_path, assets):
    from helpers import CLASSIFIER, adapter_tensors, finetune_argv, losses

    from sparsegrad.finetune.cli import main

    model, data = assets
    for name, flags in (("ordinary", {}), ("layerwise", {"layerwise_step": True})):
        assert main(finetune_argv(CLASSIFIER, model, data, "sparsegrad", "dynamic", steps=3,
                                  output_dir=tmp_path / name, **flags)) == 0
    assert losses(tmp_path / "ordinary") == losses(tmp_path / "layerwise")
    a, b = adapter_tensors(tmp_path / "ordinary"), adapter_tensors(tmp_path / "layerwise")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(("method", "flags", "message"), [
    ("lora", {}, "applies to the sparsegrad and meprop methods only, not 'lora'"),
    ("sparsegrad", {"support": "fixed"}, "does not work with --support fixed"),
    ("sparsegrad", {"grad_accum": 2}, "does not work with --grad-accum 2"),
    ("meprop", {"on_nonfinite": "skip"}, "does not work with --on-nonfinite skip"),
    ("sparsegrad", {"refresh_every": 2}, "does not work with --refresh-every"),
])
def test_cli_layerwise_step_refusals(tmp_path, capsys, assets, method, flags, message):
    from helpers import CLASSIFIER, finetune_argv

    from sparsegrad.finetune.cli import main

    flags = {"support": "dynamic", **flags}
    argv = finetune_argv(CLASSIFIER, *assets, method, flags.pop("support"),
                         output_dir=tmp_path / "out", layerwise_step=True, **flags)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsegrad: error: --layerwise-step") and message in err[0]


def test_cli_layerwise_step_refuses_torchrun(tmp_path, capsys, assets, monkeypatch):
    from helpers import CLASSIFIER, finetune_argv

    from sparsegrad.finetune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group starts
    assert main(finetune_argv(CLASSIFIER, *assets, "sparsegrad", "dynamic", output_dir=tmp_path / "out",
                              layerwise_step=True)) == 2
    assert "--layerwise-step does not work with torchrun (2 processes)" in capsys.readouterr().err
