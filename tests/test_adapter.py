"""Adapters: exact reload, fingerprint checks, corrupt files, atomic writes."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import sparsegrad as sg
from conftest import bert_batches, make_tiny_bert
from test_model import converted_bert, train


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_round_trip_reproduces_outputs_exactly(tmp_path, support):
    model = converted_bert(support)
    model.bert.encoder.layer[0].attention.output.dense.weight.requires_grad_(False)
    train(model, steps=4)
    batch = bert_batches(1, seed=3)[0]
    expected = model(**batch).logits.detach()
    sg.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    name = "bert.encoder.layer.0.intermediate.dense"
    assert tensors[f"{name}.delta_indices"].dtype == torch.int32
    assert "classifier.weight" in tensors and "bert.encoder.layer.0.output.LayerNorm.weight" in tensors
    assert "bert.encoder.layer.0.attention.output.dense.weight" not in tensors  # frozen: not saved
    assert sum(k.startswith("bases/u_out/") for k in tensors) == 2  # once per kind
    loaded = sg.load_adapter(make_tiny_bert(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert size > 0


def test_refuses_another_base(tmp_path):
    model = converted_bert()
    train(model)
    sg.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="weights differ"):
        sg.load_adapter(make_tiny_bert(seed=5), tmp_path / "a")
    from conftest import make_tiny_bert as mk
    deeper = mk(layers=3)
    with pytest.raises(ValueError, match="does not fit the adapter"):
        sg.load_adapter(deeper, tmp_path / "a")


def test_corrupt_truncated_and_torn_files(tmp_path):
    model = converted_bert()
    train(model)
    path = sg.save_adapter(model, tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated|does not match"):
        sg.load_adapter(make_tiny_bert(), path)
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        sg.load_adapter(make_tiny_bert(), path)
    weights.write_bytes(good)
    cfg = path / "adapter_config.json"
    meta = json.loads(cfg.read_text())
    meta["weights_sha256"] = "0" * 64
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        sg.load_adapter(make_tiny_bert(), path)
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sg.load_adapter(make_tiny_bert(), path)
    with pytest.raises(FileNotFoundError):
        sg.load_adapter(make_tiny_bert(), tmp_path / "nowhere")


def test_save_is_atomic_and_overwrites_cleanly(tmp_path, monkeypatch):
    model = converted_bert()
    path = sg.save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    train(model)

    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        sg.save_adapter(model, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # old adapter intact, no temp files
    sg.save_adapter(model, path)
    assert sorted(p.name for p in path.iterdir()) == sorted(before)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="converted"):
        sg.save_adapter(make_tiny_bert(), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        sg.save_adapter(converted_bert(), tmp_path / "file")


def test_adapter_without_bases_needs_the_same_bases(tmp_path):
    model = make_tiny_bert()
    cfg = sg.SparseGradConfig(density=0.05)
    bases = sg.estimate_bases(model, cfg, bert_batches(3), progress=False)
    sg.get_sparsegrad_model(model, cfg, bases)
    train(model)
    batch = bert_batches(1, seed=3)[0]
    expected = model(**batch).logits.detach()
    full = sg.save_adapter(model, tmp_path / "full")
    slim = sg.save_adapter(model, tmp_path / "slim", save_bases=False)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())
    assert size(slim) < size(full)
    with pytest.raises(ValueError, match="saved without its bases"):
        sg.load_adapter(make_tiny_bert(), slim)
    other = sg.estimate_bases(make_tiny_bert(), cfg, bert_batches(3, seed=8), progress=False)
    with pytest.raises(ValueError, match="not the ones"):
        sg.load_adapter(make_tiny_bert(), slim, bases=other)
    loaded = sg.load_adapter(make_tiny_bert(), slim, bases=bases)
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("corrupt,msg", [
    (lambda t, n: t.__setitem__(f"{n}.delta_indices", t[f"{n}.delta_indices"].float()), "must be int32 or int64"),
    (lambda t, n: t.__setitem__(f"{n}.delta_values", t[f"{n}.delta_values"].int()), "must be floating point"),
    (lambda t, n: t[f"{n}.delta_values"].__setitem__(0, float("nan")), "delta_values hold NaN or inf"),
    (lambda t, n: t.__setitem__(f"{n}.delta_indices", t[f"{n}.delta_indices"].flip(0).contiguous()), "unsorted"),
    (lambda t, n: t[f"{n}.delta_indices"].__setitem__(-1, 10**7), "fall outside its"),
    (lambda t, n: t.__setitem__(f"{n}.delta_indices", t[f"{n}.delta_indices"].view(1, -1)), "delta must be 1-D"),
    (lambda t, n: t.pop(f"{n}.delta_values"), "lacks the delta of"),
    (lambda t, n: t.pop("classifier.weight"), "lacks the trained parameter classifier.weight"),
    (lambda t, n: t.__setitem__("classifier.weight", torch.zeros(1, 1)), "classifier.weight is [1, 1]"),
    (lambda t, n: t["classifier.weight"].fill_(float("inf")), "classifier.weight holds NaN or inf"),
    (lambda t, n: t[next(k for k in t if k.startswith("bases/"))].fill_(float("nan")), "holds NaN or inf"),
])
def test_load_refuses_inconsistent_tensors(tmp_path, corrupt, msg):
    """A well-formed file with bad contents (rewritten with a matching checksum) is refused by name."""
    from safetensors.torch import save as st_save

    from sparsegrad.io import sha256_bytes

    model = converted_bert()
    train(model)
    path = sg.save_adapter(model, tmp_path / "a")
    tensors = load_file(path / "adapter_model.safetensors")
    corrupt(tensors, "bert.encoder.layer.0.intermediate.dense")
    blob = st_save(tensors)
    (path / "adapter_model.safetensors").write_bytes(blob)
    meta = json.loads((path / "adapter_config.json").read_text())
    meta["weights_sha256"] = sha256_bytes(blob)
    (path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(msg)):
        sg.load_adapter(make_tiny_bert(), path)


def test_extra_files_are_saved_checked_and_named_safely(tmp_path):
    model = converted_bert()
    path = sg.save_adapter(model, tmp_path / "a", extra_files={"task.json": b'{"x": 1}'})
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "task.json"]
    assert sg.adapter.read_adapter_file(path, "task.json") == b'{"x": 1}'
    with pytest.raises(ValueError, match="records no file 'other.json'"):
        sg.adapter.read_adapter_file(path, "other.json")
    for bad in ("../escape.json", "sub/x", ".hidden", "adapter_config.json", ""):
        with pytest.raises(ValueError, match="must be a plain file name"):
            sg.save_adapter(model, tmp_path / "b", extra_files={bad: b"x"})
    with pytest.raises(TypeError, match="must be bytes"):
        sg.save_adapter(model, tmp_path / "b", extra_files={"task.json": "text"})
    assert not (tmp_path / "b").exists() and not (tmp_path / "escape.json").exists()
