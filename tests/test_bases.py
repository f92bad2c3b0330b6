"""Calibration: streaming Gram factors equal an explicit HOSVD of the stacked gradients."""

import copy

import pytest
import torch

import sparsegrad as sg
from conftest import bert_batches, make_tiny_bert, make_tiny_llama, llama_batches


def explicit_hosvd(stack: torch.Tensor):
    """Left singular vectors of the mode unfoldings of a steps x out x in tensor (fp64)."""
    n, out_f, in_f = stack.shape
    u_out = torch.linalg.svd(stack.permute(1, 0, 2).reshape(out_f, n * in_f), full_matrices=True)[0]
    u_in = torch.linalg.svd(stack.permute(2, 0, 1).reshape(in_f, n * out_f), full_matrices=True)[0]
    return u_out, u_in


def assert_same_up_to_sign(a, b, cols, atol):
    for j in range(cols):
        s = torch.sign((a[:, j] * b[:, j]).sum())
        torch.testing.assert_close(a[:, j] * s, b[:, j], rtol=0, atol=atol)


def test_gram_factors_equal_explicit_hosvd_on_random_data():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(9, 20, 14, generator=g, dtype=torch.float64)
    stack = stack * torch.linspace(3, 0.1, 20, dtype=torch.float64)[None, :, None]  # distinct spectrum
    gram_out = sum(s @ s.T for s in stack)
    gram_in = sum(s.T @ s for s in stack)
    u_out, ev_out = sg.factors_from_gram(gram_out)
    u_in, _ = sg.factors_from_gram(gram_in)
    ref_out, ref_in = explicit_hosvd(stack)
    assert torch.all(ev_out[:-1] >= ev_out[1:])
    assert_same_up_to_sign(u_out, ref_out, 20, 1e-8)
    assert_same_up_to_sign(u_in, ref_in, 14, 1e-8)


def test_estimate_bases_equals_explicit_hosvd_of_the_model_gradients():
    model = make_tiny_bert()
    cfg = sg.SparseGradConfig(density=0.05, calibration_dtype="float64", score_steps=0)
    batches = bert_batches(5)
    # independent reference: plain autograd on an untouched copy, gradients stacked per kind
    ref = copy.deepcopy(model)
    grads = {"intermediate": [], "output": []}
    for batch in batches:
        ref.zero_grad()
        ref(**batch).loss.backward()
        for i, layer in enumerate(ref.bert.encoder.layer):
            grads["intermediate"].append(layer.intermediate.dense.weight.grad.double().clone())
            grads["output"].append(layer.output.dense.weight.grad.double().clone())
    bases = sg.estimate_bases(model, cfg, batches, progress=False)
    for short, kind in [("intermediate", "bert.encoder.layer.*.intermediate.dense"),
                        ("output", "bert.encoder.layer.*.output.dense")]:
        ref_out, ref_in = explicit_hosvd(torch.stack(grads[short]))
        u_out, u_in = bases.factors[kind]
        assert u_out.dtype == torch.float32
        torch.testing.assert_close(u_out.T @ u_out, torch.eye(u_out.shape[0]), rtol=0, atol=1e-5)
        # the leading directions carry the energy: compare them (trailing ones are a near-degenerate null space)
        assert_same_up_to_sign(u_out.double(), ref_out, 8, 1e-4)
        assert_same_up_to_sign(u_in.double(), ref_in, 8, 1e-4)


def test_calibration_leaves_the_model_as_it_was():
    model = make_tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    sentinel = torch.ones_like(model.classifier.weight)
    model.classifier.weight.grad = sentinel
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sg.estimate_bases(model, sg.SparseGradConfig(density=0.05), bert_batches(3), progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.classifier.weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")


def test_report_fixed_support_and_save_load(tmp_path):
    model = make_tiny_bert()
    cfg = sg.SparseGradConfig(density=0.05, support="fixed", score_steps=2)
    bases = sg.estimate_bases(model, cfg, bert_batches(4), progress=False)
    for kind, entry in bases.report.items():
        assert 0 < entry["energy_topk_original"] <= 1 and 0 < entry["energy_topk_rotated"] <= 1
        assert entry["steps"] == 4 and entry["modules"] == 2 and entry["k"] == cfg.budget(64, 32)
    assert len(bases.fixed_supports) == 4
    assert all(idx.numel() == cfg.budget(64, 32) for idx in bases.fixed_supports.values())
    bases.save(tmp_path / "bases.safetensors")
    loaded = sg.SparseGradBases.load(tmp_path / "bases.safetensors")
    assert loaded.report == bases.report
    for kind in bases.factors:
        assert torch.equal(loaded.factors[kind][0], bases.factors[kind][0])
    for name in bases.fixed_supports:
        assert torch.equal(loaded.fixed_supports[name], bases.fixed_supports[name])
    assert not list(tmp_path.glob(".*tmp"))


def test_llama_kinds_per_layer_and_bf16():
    model = make_tiny_llama().to(torch.bfloat16)
    cfg = sg.SparseGradConfig(target_modules=sg.LLAMA_MLP_TARGETS, density=0.05, basis_sharing="layer",
                              layers_to_transform=[1])
    bases = sg.estimate_bases(model, cfg, llama_batches(2), progress=False)
    assert sorted(bases.factors) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert all(u.dtype == torch.float32 for pair in bases.factors.values() for u in pair)
    shared = sg.estimate_bases(make_tiny_llama(), sg.SparseGradConfig(target_modules=sg.LLAMA_MLP_TARGETS),
                               llama_batches(2), progress=False)
    assert sorted(shared.factors) == [f"model.layers.*.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


def test_calibration_errors():
    model = make_tiny_bert()
    cfg = sg.SparseGradConfig(density=0.05)
    with pytest.raises(ValueError, match="no batches"):
        sg.estimate_bases(model, cfg, [], progress=False)
    with pytest.raises(ValueError, match="all zero"):
        sg.estimate_bases(model, cfg, bert_batches(2), loss_fn=lambda m, b: m(**b).logits.sum() * 0.0,
                          progress=False)
    with pytest.raises(ValueError, match="not finite"):
        sg.estimate_bases(model, cfg, bert_batches(2), loss_fn=lambda m, b: m(**b).loss * float("inf"),
                          progress=False)
    with pytest.raises(ValueError, match="matches no module"):
        sg.estimate_bases(model, sg.SparseGradConfig(target_modules=r"nothing\.here"), bert_batches(1),
                          progress=False)
    with pytest.raises(ValueError, match="LayerNorm"):
        sg.estimate_bases(model, sg.SparseGradConfig(target_modules=r".*output\.LayerNorm"), bert_batches(1),
                          progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        sg.estimate_bases(model, sg.SparseGradConfig(k=10**6), bert_batches(1), progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        sg.estimate_bases(model, cfg, bert_batches(1), steps=0, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # restored after every failure


def test_bases_file_errors(tmp_path):
    bad = tmp_path / "bases.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        sg.SparseGradBases.load(bad)
    with pytest.raises(FileNotFoundError):
        sg.SparseGradBases.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("edit,msg", [
    (lambda t, m: t.__setitem__("u_out/k", t["u_out/k"] * 1.01), "u_out of 'k' in .* is not orthogonal"),
    (lambda t, m: t.__setitem__("u_in/k", t["u_in/k"][:, :3].contiguous()), "must be a square matrix"),
    (lambda t, m: m.__setitem__("report", "{oops"), "'identity' or 'report' metadata is damaged"),
    (lambda t, m: m.__setitem__("identity", "3"), "'identity' or 'report' metadata is damaged"),
])
def test_bases_file_contents_are_checked_on_load(tmp_path, edit, msg):
    from safetensors import safe_open
    from safetensors.torch import save_file

    q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))[0].contiguous()
    path = tmp_path / "bases.safetensors"
    sg.SparseGradBases(factors={"k": (q, torch.eye(4))}).save(path)
    assert torch.equal(sg.SparseGradBases.load(path).factors["k"][0], q)  # orthogonal: loads
    tensors = {"u_out/k": q.clone(), "u_in/k": torch.eye(4)}
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=msg):
        sg.SparseGradBases.load(path)
