"""transformers.Trainer integration: SparseGradTrainer checkpoints hold the adapter (never the base weights),
resume is exact, and SparseGradCallback works with a stock Trainer."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASSIFIER, make_tiny_bert, tiny_model_dir
from transformers import Trainer, TrainingArguments

import sparsegrad as sg
from sparsegrad.finetune.trainer import SparseGradCallback, SparseGradTrainer, is_sparsegrad_adapter

ROOT = Path(__file__).resolve().parents[1]


def learnable_examples(n=48, length=10, seed=0):
    """Each example's tokens come from its class's id range: a task a tiny BERT learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        y = i % 3
        ids = torch.randint(1 + 40 * y, 40 + 40 * y, (length,), generator=g)
        items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                      "labels": torch.tensor(y)})
    return items


def converted_tiny_bert(data, density=0.1, support="dynamic"):
    model = make_tiny_bert().train()
    cfg = sg.SparseGradConfig(density=density, support=support)
    batches = [{k: torch.stack([e[k] for e in data[i:i + 8]]) for k in data[0]} for i in range(0, 16, 8)]
    sg.get_sparsegrad_model(model, cfg, sg.estimate_bases(model, cfg, batches, progress=False),
                            keep_requires_grad=True)  # the whole model trains, as these trainer tests need
    return model


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=6, save_strategy="steps",
                save_steps=3, logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False,
                disable_tqdm=True, seed=0, learning_rate=1e-2)
    base.update(kw)
    return TrainingArguments(**base)


def _optimizers(model, lr=1e-2):
    opt = sg.create_optimizer(model, lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


@torch.no_grad()
def _loss(model, data):
    was = model.training
    model.eval()
    batch = {k: torch.stack([e[k] for e in data]) for k in data[0]}
    loss = float(model(**batch).loss)
    model.train(was)
    return loss


def test_trainer_trains_and_checkpoints_only_the_adapter(tmp_path):
    data = learnable_examples()
    model = converted_tiny_bert(data)
    before = _loss(model, data)
    trainer = SparseGradTrainer(model=model, args=_args(tmp_path, max_steps=12, save_steps=6), train_dataset=data,
                                optimizers=_optimizers(model))
    trainer.train()
    assert _loss(model, data) < before - 0.05
    assert sum(layer.entries_updated() for layer in sg.sparsegrad_layers(model).values()) > 0
    for step in (6, 12):
        ckpt = tmp_path / f"checkpoint-{step}"
        names = {f.name for f in ckpt.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}
        assert is_sparsegrad_adapter(ckpt)
    # The last checkpoint reloads into a fresh base with the trained model's outputs.
    fresh = sg.load_adapter(make_tiny_bert(), tmp_path / "checkpoint-12").eval()
    ids = torch.randint(1, 120, (3, 7))
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6)
    trainer.save_model(str(tmp_path / "final"))
    assert {f.name for f in (tmp_path / "final").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_resume_from_checkpoint_is_exact(tmp_path, support):
    data = learnable_examples()
    model = converted_tiny_bert(data, support=support)
    SparseGradTrainer(model=model, args=_args(tmp_path), train_dataset=data, optimizers=_optimizers(model)).train()
    resumed = converted_tiny_bert(data, support=support)
    trainer = SparseGradTrainer(model=resumed, args=_args(tmp_path, save_strategy="no"), train_dataset=data,
                                optimizers=_optimizers(resumed))
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    full, half = sg.sparsegrad_layers(model), sg.sparsegrad_layers(resumed)
    for name, layer in full.items():
        assert torch.equal(layer.delta_indices, half[name].delta_indices)
        assert torch.allclose(layer.delta_values, half[name].delta_values, atol=1e-7)


def test_callback_with_stock_trainer(tmp_path):
    data = learnable_examples()
    model = converted_tiny_bert(data)
    trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=data,
                      optimizers=_optimizers(model), callbacks=[SparseGradCallback()])
    trainer.train()
    adapter = tmp_path / "sparsegrad_adapter"
    assert is_sparsegrad_adapter(adapter)
    fresh = sg.load_adapter(make_tiny_bert(), adapter).eval()
    ids = torch.randint(1, 120, (2, 5))
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6)


def test_unconverted_model_saves_as_usual(tmp_path):
    data = learnable_examples(n=16)
    model = make_tiny_bert().train()
    trainer = SparseGradTrainer(model=model, args=_args(tmp_path, max_steps=1, save_strategy="no"),
                                train_dataset=data, optimizers=_optimizers(model))
    trainer.train()
    trainer.save_model(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_hf_trainer_example(tmp_path):
    model_dir = tiny_model_dir(CLASSIFIER, tmp_path / "model")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "hf_trainer.py"), "--model", str(model_dir),
         "--max-train", "16", "--max-eval", "8", "--max-length", "32", "--output-dir", str(tmp_path / "ex")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reloaded adapter reproduces the trained model" in proc.stdout
    assert (tmp_path / "ex" / "final" / "adapter_model.safetensors").is_file()
