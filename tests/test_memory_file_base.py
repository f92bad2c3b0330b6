"""W0 left in the checkpoint's safetensors file (`sparsegrad.file_base`): a model loaded from disk trains, saves and
reloads bit for bit as the same model held in memory; whatever differs from the file stays in memory; a file
changed under a converted model is refused by name."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import sparsegrad as sg
from conftest import bert_batches, make_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint(tmp_path):
    make_tiny_bert(seed=3).save_pretrained(str(tmp_path / "ckpt"))  # safetensors, with the head
    return tmp_path / "ckpt"


def _load(folder, in_memory=False):
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    if in_memory:
        model.config._name_or_path = ""  # as a model built in memory: no file to re-read W0 from
    return model


def _convert(model, support="dynamic", bases=None):
    cfg = sg.SparseGradConfig(density=0.05, support=support)
    bases = bases or sg.estimate_bases(model, cfg, bert_batches(2, seed=0), progress=False)
    return sg.get_sparsegrad_model(model, cfg, bases), bases


def _held(model) -> list[bool]:
    return ["base_weight" in layer._buffers for layer in sg.sparsegrad_layers(model).values()]


def _train(model, steps, seed=1):
    model.train()
    opt = sg.create_optimizer(model, lr=1e-2)
    for batch in bert_batches(steps, seed=seed):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), opt


def _assert_same_bits(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_w0_from_the_file_trains_saves_and_reloads_bit_for_bit_as_in_memory(checkpoint, tmp_path, support):
    batch = bert_batches(1, seed=9)[0]
    with torch.no_grad():
        plain = _load(checkpoint)(**batch).logits
    on_disk, bases = _convert(_load(checkpoint), support)
    in_memory, _ = _convert(_load(checkpoint, in_memory=True), support, bases)
    # a fixed support rebuilds from W0 at every forward: re-reading the file each step would cost more than the copy
    in_file = support == "dynamic"
    assert _held(on_disk) == [not in_file] * 4 and _held(in_memory) == [True] * 4
    with torch.no_grad():
        assert torch.equal(on_disk(**batch).logits, plain)  # exact at conversion
    # 18 steps: past the dynamic step's exact rebuild (every 16), the fixed mode rebuilds at every forward
    (on_disk, opt_disk), (in_memory, opt_mem) = _train(on_disk, 18), _train(in_memory, 18)
    _assert_same_bits(on_disk.state_dict(), in_memory.state_dict())  # W0 included, read back from the file
    reference = _load(checkpoint).state_dict()
    for name in sg.sparsegrad_layers(on_disk):
        assert torch.equal(on_disk.state_dict()[f"{name}.base_weight"], reference[f"{name}.weight"])
    sg.save_adapter(on_disk, tmp_path / "adapter")
    reloaded = sg.load_adapter(_load(checkpoint), tmp_path / "adapter")
    assert _held(reloaded) == [not in_file] * 4
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, in_memory(**batch).logits)
    # a basis refresh folds the delta into W0: from then on W0 is held, the same bits as in memory
    sg.refresh_bases(on_disk, bases, opt_disk)
    sg.refresh_bases(in_memory, bases, opt_mem)
    assert _held(on_disk) == [True] * 4
    _assert_same_bits(on_disk.state_dict(), in_memory.state_dict())


def test_a_bf16_model_keeps_w0_in_memory(checkpoint):
    """A bf16 weight rebuilds exactly from W0 at every step (small increments would round away): W0 stays held."""
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), dtype=torch.bfloat16).eval()
    converted, _ = _convert(model)
    assert _held(converted) == [True] * 4


def test_a_weight_changed_after_loading_stays_in_memory(checkpoint):
    model = _load(checkpoint)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, 0] += 1e-3
        expected = model(**bert_batches(1, seed=9)[0]).logits
    converted, _ = _convert(model)
    assert _held(converted) == [False, False, False, True]  # layer 1's output matrix no longer matches the file
    with torch.no_grad():
        assert torch.equal(converted(**bert_batches(1, seed=9)[0]).logits, expected)


def test_a_checkpoint_rewritten_under_a_converted_model_is_refused_by_name(checkpoint):
    model, _ = _convert(_load(checkpoint))
    make_tiny_bert(seed=3).save_pretrained(str(checkpoint))  # the same weights, written again
    layer = next(iter(sg.sparsegrad_layers(model).values()))
    with pytest.raises(ValueError, match=r"model file .*model\.safetensors changed since"):
        layer.sync_weight(force=True)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model file .*model\.safetensors is gone since"):
        layer.sync_weight(force=True)


def test_a_state_dict_loads_into_models_with_w0_held_or_in_the_file(checkpoint):
    trained, bases = _convert(_load(checkpoint))
    trained, _ = _train(trained, 3)
    saved = trained.state_dict()
    batch = bert_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = trained(**batch).logits
    for in_memory in (False, True):
        fresh, _ = _convert(_load(checkpoint, in_memory=in_memory), bases=bases)
        fresh.load_state_dict(saved)
        assert _held(fresh) == [in_memory] * 4  # the file's W0 arrived: nothing to hold
        with torch.no_grad():
            assert torch.equal(fresh(**batch).logits, expected)
    # a state_dict whose W0 differs from the file's: that layer holds the incoming W0
    other = dict(saved)
    name = next(iter(sg.sparsegrad_layers(trained)))
    other[f"{name}.base_weight"] = saved[f"{name}.base_weight"] + 1
    fresh, _ = _convert(_load(checkpoint), bases=bases)
    fresh.load_state_dict(other)
    assert _held(fresh) == [True, False, False, False]
    assert torch.equal(fresh.state_dict()[f"{name}.base_weight"], other[f"{name}.base_weight"])


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_the_checkpoint_mapping_is_let_go_and_tied_weights_stay_tied(tmp_path, support):
    """W0 in the file (dynamic) or held (fixed): the converted matrices' original pages go either way."""
    import gc

    from transformers import AutoModelForCausalLM

    from conftest import llama_batches
    from helpers import CAUSAL_LM, tiny_model

    tiny_model(CAUSAL_LM, seed=2, tie_word_embeddings=True).save_pretrained(str(tmp_path / "lm"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")).eval()
    batch = llama_batches(1, seed=4)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    file = (tmp_path / "lm" / "model.safetensors").resolve()
    if not _mapped(file):
        pytest.skip("transformers did not map the checkpoint into memory")
    cfg = sg.SparseGradConfig(target_modules=sg.LLAMA_MLP_TARGETS, density=0.05, support=support)
    sg.get_sparsegrad_model(model, cfg, sg.estimate_bases(model, cfg, llama_batches(2), progress=False))
    gc.collect()
    assert _held(model)[0] == (support == "fixed") and not _mapped(file)  # W0 in the file, and no page of its mapping resident
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)
