"""The real bundled MiniLM-L6 on real BBC text: exactness at conversion and gradient concentration."""

import copy

import pytest
import torch

import sparsegrad as sg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_and_batches():
    from sparsegrad.finetune.data import load_task, make_batches
    from sparsegrad.finetune.models import load_classifier

    data = load_task("bbc", seed=0, max_train=40, max_eval=8)
    model, tok = load_classifier("minilm", num_labels=data.num_labels)
    torch.manual_seed(0)
    model.classifier.reset_parameters()
    batches = make_batches(tok, data.train_texts, data.train_labels, batch_size=8, max_length=64, shuffle=True, seed=0)
    return model.eval(), batches


def test_real_minilm_exact_at_conversion(minilm_and_batches):
    base, batches = minilm_and_batches
    model = copy.deepcopy(base)
    cfg = sg.SparseGradConfig(density=0.01, score_steps=1)
    bases = sg.estimate_bases(model, cfg, batches[:3], progress=False)
    for entry in bases.report.values():  # the rotation concentrates real gradients
        assert entry["energy_topk_rotated"] > entry["energy_topk_original"]
    sg.get_sparsegrad_model(model, cfg, bases)
    assert len(sg.sparsegrad_layers(model)) == 12
    batch = batches[4]

    def run(m):
        m.zero_grad()
        emb = m.bert.embeddings.word_embeddings(batch["input_ids"]).detach().requires_grad_(True)
        out = m(inputs_embeds=emb, attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids"),
                labels=batch["labels"])
        out.loss.backward()
        return out.logits.detach(), emb.grad

    ref = copy.deepcopy(base)
    logits_ref, gx_ref = run(ref)
    logits, gx = run(model)
    assert (logits - logits_ref).abs().max() <= 1e-6
    assert (gx - gx_ref).abs().max() <= 1e-6 * max(1.0, gx_ref.abs().max())
    ref_modules = dict(ref.named_modules())
    for name, layer in sg.sparsegrad_layers(model).items():
        torch.testing.assert_close(layer.bias.grad, ref_modules[name].bias.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.weight.grad, ref_modules[name].weight.grad, rtol=1e-5, atol=1e-7)
