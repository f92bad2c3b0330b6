"""Decoders: SparseGrad on LLaMA gate/up/down MLPs, chat-template data with masked prompts, the decoder training path,
generation, bf16, and one short run on the real SmolLM2 (slow)."""

import json
from pathlib import Path

import pytest
import torch

from helpers import CAUSAL_LM, chat_tokenizer, tiny_model, tiny_model_dir

import sparsegrad as sg
from sparsegrad.finetune import lm
from sparsegrad.finetune.cli import main
from sparsegrad.finetune.methods import DEFAULT_LR, METHODS, block_indices, prepare_method
from sparsegrad.finetune.train import finetune, load_finetuned

ROOT = Path(__file__).resolve().parents[1]
LM_KEYS = {"method", "task", "seed", "train_steps", "step_time_median_s", "calibration_time_s", "peak_rss_mb",
           "train_state_bytes", "trainable_entries", "entries_updated", "adapter_bytes", "eval_loss",
           "eval_perplexity", "eval_exact_match", "model_kind", "layers_to_transform"}


# ------------------------------------------------------------------------------------------------- tiny models
def tiny_llama(layers=4, vocab=128, seed=0, dtype=torch.float32):
    return tiny_model(CAUSAL_LM, layers=layers, vocab=vocab, seed=seed, dtype=dtype, max_positions=256,
                      tie_word_embeddings=False, pad_token_id=2, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    """A 4-block random LlamaForCausalLM + the tiny tokenizer, saved like a real checkpoint."""
    return tiny_model_dir(CAUSAL_LM, tmp_path_factory.mktemp("tiny-llama") / "model", tokenizer=tok)


def batches(n, vocab=128, batch=2, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


# ------------------------------------------------------------------------------------------------- conversion
def test_gate_up_down_kinds_blocks_and_exactness():
    model = tiny_llama(layers=4)
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    cfg = sg.SparseGradConfig(target_modules=sg.LLAMA_MLP_TARGETS, density=0.05, layers_to_transform=[0, 3])
    bases = sg.estimate_bases(model, cfg, batches(2), progress=False)
    assert set(bases.report) == {f"model.layers.*.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert all(entry["modules"] == 2 for entry in bases.report.values())
    sg.get_sparsegrad_model(model, cfg, bases)
    layers = sg.sparsegrad_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.mlp.{p}" for i in (0, 3)
                                    for p in ("gate_proj", "up_proj", "down_proj"))
    gate0, gate3 = layers["model.layers.0.mlp.gate_proj"], layers["model.layers.3.mlp.gate_proj"]
    assert gate0.u_out is gate3.u_out and gate0.u_out.shape == (48, 48) and gate0.u_in.shape == (32, 32)
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.u_out.shape == (32, 32) and down.u_in.shape == (48, 48) and down.u_out is not gate0.u_out
    assert type(model.model.layers[1].mlp.gate_proj) is torch.nn.Linear  # blocks 1, 2 untouched
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # bit-exact at conversion


@pytest.mark.parametrize("method", METHODS)
def test_every_nth_block_scope_mlp_trains_only_chosen_mlps(method):
    model = tiny_llama(layers=4)
    prep = prepare_method(model, method, density=0.05, layers_to_transform=block_indices(model, 3),
                          head_names=(), calibration_batches=batches(2) if method == "sparsegrad" else None)
    assert len(prep.target_names) == 6 and all(".layers.0." in n or ".layers.3." in n for n in prep.target_names)
    trainable = [n for n, p in prep.model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert ".layers.0.mlp." in name or ".layers.3.mlp." in name, name
        if method == "lora":
            assert ".lora_" in name
    if method == "lora":
        assert prep.lora_rank >= 1 and len(prep.target_names) == 6
    # One step moves only chosen MLP weights.
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    opt = sg.create_optimizer(prep.model, lr=1e-2)
    prep.model.train()
    prep.model(**batches(1, seed=1)[0]).loss.backward()
    opt.step()
    changed = {n for n, p in prep.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".layers.0.mlp." in n or ".layers.3.mlp." in n for n in changed)


def _train(model, method="sparsegrad", steps=2, support="dynamic"):
    prep = prepare_method(model, method, density=0.05, support=support, head_names=(),
                          layers_to_transform=[0, 2], calibration_batches=batches(2))
    opt = sg.create_optimizer(prep.model, lr=1e-2)
    prep.model.train()
    for b in batches(steps, seed=5):
        prep.model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    return prep.model.eval()


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_merge_and_adapter_roundtrip_equal_logits(tmp_path, support):
    model = _train(tiny_llama(layers=3), support=support)
    ids = batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert not torch.equal(trained, tiny_llama(layers=3)(input_ids=ids).logits)
    sg.save_adapter(model, tmp_path / "adapter")
    loaded = sg.load_adapter(tiny_llama(layers=3), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained)
    merged = sg.merge_and_unload(model)
    assert not sg.sparsegrad_layers(merged)
    assert set(merged.state_dict()) == set(tiny_llama(layers=3).state_dict())
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, trained)


def test_bf16_weights_fp32_bases_exact_conversion_and_training():
    model = tiny_llama(layers=2, dtype=torch.bfloat16)
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    cfg = sg.SparseGradConfig(target_modules=sg.LLAMA_MLP_TARGETS, density=0.05)
    bases = sg.estimate_bases(model, cfg, batches(2), progress=False)
    sg.get_sparsegrad_model(model, cfg, bases)
    layer = sg.sparsegrad_layers(model)["model.layers.0.mlp.up_proj"]
    assert layer.weight.dtype == torch.bfloat16 and layer.u_out.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # conversion copies the bf16 weight: exact
    opt = sg.create_optimizer(model, lr=1e-2)
    model.train()
    w0 = layer.weight.detach().clone()
    loss = model(**batches(1, seed=3)[0]).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert layer.delta_values.dtype == torch.float32 and layer.entries_updated() > 0
    assert not torch.equal(layer.weight, w0) and layer.weight.dtype == torch.bfloat16
    # The bf16 weight is W0 + delta rounded once.
    expect = (layer.base_weight.float() + layer.delta_weight()).to(torch.bfloat16)
    assert torch.equal(layer.weight.detach(), expect)


# ------------------------------------------------------------------------------------------------- data
def test_chat_prompt_and_loss_masking(tok):
    prompt = lm.chat_prompt(tok, "Hello there")
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                             tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ex, cut = lm.build_chat_example(tok, "Hello there", "sport", max_length=64)
    assert not cut
    n = len(ex.prompt_ids)
    assert ex.input_ids[:n] == ex.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex.labels[:n] == [-100] * n  # prompt tokens masked
    answer = ex.labels[n:]
    assert answer and -100 not in answer and answer == ex.input_ids[n:]
    assert tok.decode(answer) == "sport<|im_end|>"  # the answer and its end-of-turn token are learned
    assert ex.target_tokens == len(answer)
    # Batches: right padding (labels -100, mask 0 there) for training, left padding for generation.
    short, _ = lm.build_chat_example(tok, "Hi", "tech", max_length=64)
    b = lm.collate_train([ex, short], pad_id=tok.pad_token_id)
    pad = len(ex.input_ids) - len(short.input_ids)
    assert pad > 0 and b["attention_mask"][1, -pad:].sum() == 0 and (b["labels"][1, -pad:] == -100).all()
    assert b["input_ids"][1, : len(short.input_ids)].tolist() == short.input_ids
    g = lm.collate_prompts([ex.prompt_ids, short.prompt_ids], pad_id=tok.pad_token_id)
    assert g["input_ids"][1, -len(short.prompt_ids):].tolist() == short.prompt_ids
    assert g["attention_mask"][1, : g["input_ids"].shape[1] - len(short.prompt_ids)].sum() == 0


def test_truncation_keeps_instruction_and_fits(tok):
    article = " ".join(["The bank reported a rise in profit as market shares grew."] * 40)
    ex, cut = lm.build_chat_example(tok, article, "business", max_length=96, make_user=lm._bbc_user)
    assert cut and len(ex.input_ids) <= 96
    assert ex.source.endswith(lm.BBC_INSTRUCTION) and ex.source.startswith("The bank")
    with pytest.raises(ValueError, match="no room"):
        lm.build_chat_example(tok, article, "business", max_length=12, make_user=lm._bbc_user)


def test_plain_prompt_without_template(tok):
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>",
                                    pad_token="<|im_end|>")
    assert lm.chat_prompt(plain, "Q?") == "Q?\n\nAnswer: "
    ex, _ = lm.build_chat_example(plain, "Q?", "yes", max_length=32)
    assert plain.decode(ex.input_ids[len(ex.prompt_ids):]) == "yes<|im_end|>"


@pytest.mark.parametrize("pred,ref,ok", [("Sport.", "sport", True), ("  sport, because of the match", "sport", True),
                                         ("SPORTS", "sport", False), ("", "tech", False),
                                         ("Tech!", "tech", True), ("The answer is tech", "tech", False),
                                         ("New York, USA", "new york usa", True), ("New York", "new york usa", False)])
def test_exact_match_normalisation(pred, ref, ok):
    assert lm.exact_match(pred, ref) is ok


def test_normalize_answer():
    assert lm.normalize_answer("  Entertainment.\n") == "entertainment"
    assert lm.normalize_answer("Hello, World!", first_word=False) == "hello world"
    assert lm.normalize_answer("...") == ""


def test_bbc_instruct_split(tok):
    data = lm.load_bbc_instruct(tok, max_length=96, max_train=30, max_eval=10)
    assert data.kind == "chat" and len(data.train) == 30 and len(data.eval) == 10
    assert {e.answer for e in data.train} <= {"business", "entertainment", "politics", "sport", "tech"}
    assert len({e.answer for e in data.eval}) == 5
    assert all(len(e.input_ids) <= 96 and e.source.endswith(lm.BBC_INSTRUCTION) for e in data.train + data.eval)
    # The split is data.load_task("bbc")'s: every held-out article is a held-out text there (never a training one).
    from sparsegrad.finetune.data import load_task

    split = load_task("bbc")
    assert not set(split.train_texts) & set(split.eval_texts)
    for e in data.eval:
        body = e.source[: -len(lm.BBC_INSTRUCTION) - 2]
        assert any(t.startswith(body) for t in split.eval_texts)


def test_shakespeare_regions_disjoint_and_deterministic(tok):
    a = lm.load_shakespeare(tok, max_length=32, max_train=40, max_eval=12)
    b = lm.load_shakespeare(tok, max_length=32, max_train=40, max_eval=12)
    c = lm.load_shakespeare(tok, max_length=32, max_train=40, max_eval=12, seed=1)
    assert [e.input_ids for e in a.train] == [e.input_ids for e in b.train]
    assert [e.input_ids for e in a.eval] == [e.input_ids for e in c.eval]  # held-out set independent of the seed
    assert [e.input_ids for e in a.train] != [e.input_ids for e in c.train]
    assert len(a.train) == 40 and len(a.eval) == 12
    assert all(len(e.input_ids) == 32 and e.labels == e.input_ids for e in a.train + a.eval)
    regions = lm.shakespeare_regions("line one\nline two\n" * 3, region_chars=10)
    assert "".join(regions) == "line one\nline two\n" * 3 and all(r.endswith("\n") for r in regions)
    # Held-out chunks come from held-out regions only.
    text_regions = lm.shakespeare_regions(__import__("sparsegrad.finetune.data", fromlist=["x"]).load_lm_text())
    held = {i for i in range(len(text_regions)) if int((i + 1) * 0.2) > int(i * 0.2)}
    ev = a.eval[0].source[:40]
    assert any(ev in text_regions[i] for i in held) and not any(ev in text_regions[i]
                                                               for i in range(len(text_regions)) if i not in held)
    # Spare chunks (for validation): as many as asked for, seeded, from training regions no training chunk comes from.
    spare = a.spare(20)
    assert len(spare) == 20 and [e.input_ids for e in spare] == [e.input_ids for e in b.spare(20)]
    assert [e.input_ids for e in a.spare(8)] == [e.input_ids for e in spare[:8]]

    def region_of(e):
        return next(i for i, r in enumerate(text_regions) if e.source[:60] in r)
    spare_regions, train_regions = {region_of(e) for e in spare}, {region_of(e) for e in a.train}
    assert not spare_regions & held and not spare_regions & train_regions


def test_pair_files(tok, tmp_path):
    rows = [{"prompt": f"What is {i} plus one?", "response": str(i + 1)} for i in range(20)]
    rows.append(dict(rows[0]))  # a duplicate prompt
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    data = lm.load_pair_files(tok, str(f), max_length=64)
    assert data.duplicates_dropped == 1 and len(data.train) + len(data.eval) == 20 and len(data.eval) == 4
    assert not {e.source for e in data.train} & {e.source for e in data.eval}
    with pytest.raises(ValueError, match="no prompt column .question.*--prompt-column"):
        lm.load_pair_files(tok, str(f), max_length=64, prompt_column="question")


# ------------------------------------------------------------------------------------------------- end to end
def _run(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir), task="bbc-instruct", max_length=96, batch_size=4, max_steps=2, max_train=16,
                max_eval=4, every_nth_block=3, output_dir=str(out), progress=False, verbose=False, density=0.05)
    base.update(kw)
    return finetune(**base)


@pytest.mark.parametrize("method", METHODS)
def test_finetune_bbc_instruct_every_method(tiny_dir, tmp_path, method):
    m = _run(tiny_dir, tmp_path / method, method=method)
    assert LM_KEYS <= set(m) and m["model_kind"] == "causal-lm" and m["task"] == "bbc-instruct"
    assert m["lr"] == DEFAULT_LR[("causal-lm", method, "mlp")]
    assert m["train_steps"] == 2 and m["layers_to_transform"] == [0, 3] and m["mlp_matrices"] == 6
    assert 0.0 <= m["eval_exact_match"] <= 1.0 and m["eval_loss"] > 0 and m["eval_tokens"] > 0
    assert m["entries_updated"] > 0 and m["adapter_bytes"] > 0
    loss_csv = (tmp_path / method / "loss.csv").read_text().splitlines()
    assert loss_csv[0] == "step,loss" and len(loss_csv) == 3
    assert json.loads((tmp_path / method / "metrics.json").read_text())["eval_loss"] == m["eval_loss"]
    # The adapter reloads onto the base: the same held-out loss.
    model, tok, info = load_finetuned(tmp_path / method / "adapter")
    assert info["model_kind"] == "causal-lm" and not sg.sparsegrad_layers(model)
    data = lm.load_bbc_instruct(tok, max_length=96, max_train=16, max_eval=4)
    again = lm.evaluate_loss(model, data.eval, tok.pad_token_id)["eval_loss"]
    assert again == pytest.approx(m["eval_loss"], rel=1e-5, abs=1e-6)


def test_finetune_shakespeare_and_pairs(tiny_dir, tmp_path):
    m = _run(tiny_dir, tmp_path / "lm", task="shakespeare", method="sparsegrad", max_length=32, max_eval=6)
    assert m["eval_exact_match"] is None and m["eval_perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"])
    assert m["data_kind"] == "text" and m["num_eval"] == 6
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"q": f"Say {w}", "a": w}) for w in "red green blue tech sport one two".split()))
    m = _run(tiny_dir, tmp_path / "pairs", task=None, train_file=str(f), prompt_column="q", response_column="a",
             method="lora", max_eval=None, max_train=None, eval_fraction=0.3)
    assert m["task"] == tmp_path.name and m["num_eval"] == 2 and m["eval_exact_match"] is not None


def test_generation_left_padding_matches_single(tiny_dir):
    model, tok = lm.load_lm_model(str(tiny_dir))
    prompts = [lm._ids(tok, lm.chat_prompt(tok, t)) for t in ("Hi", "A much longer question about the market?")]
    both = lm.generate_answers(model, tok, prompts, max_new_tokens=5)
    one = [lm.generate_answers(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert both == one


def test_cli_finetune_generate_merge_and_compare(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["finetune", "--model", str(tiny_dir), "--task", "bbc-instruct", "--max-length", "96",
               "--max-steps", "2", "--batch-size", "4", "--max-train", "8", "--max-eval", "3", "--every-nth-block",
               "2", "--output-dir", str(out), "--no-progress", "--method", "meprop"])
    text = capsys.readouterr().out
    assert rc == 0 and "exact match" in text and "blocks [0, 2]" in text
    rc = main(["generate", "--adapter", str(out / "adapter"), "--task", "bbc-instruct", "--num-examples", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and text.count("reference:") == 2 and "exact match" in text
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "3"])
    assert rc == 0 and "answer:" in capsys.readouterr().out
    rc = main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "merged")])
    assert rc == 0 and "AutoModelForCausalLM" in capsys.readouterr().out
    assert main(["generate", "--prompt", "x", "--task", "bbc-instruct"]) == 2  # mutually exclusive
    # calibrate takes decoder tasks too (the same task kinds as finetune)
    assert main(["calibrate", "--model", str(tiny_dir), "--task", "shakespeare", "--max-length", "32", "--no-progress",
                 "--output-dir", str(tmp_path / "cal")]) == 0
    assert json.loads((tmp_path / "cal" / "report.json").read_text())["task"] == "shakespeare"
    assert main(["finetune", "--model", str(tiny_dir), "--task", "bbc", "--no-progress"]) == 2  # a causal LM
    assert "is a causal LM" in capsys.readouterr().err
    capsys.readouterr()
    # compare: one method in a subprocess, then the decoder report from its metrics.
    cmp = tmp_path / "cmp"
    rc = main(["compare", "--methods", "sparsegrad", "--seeds", "0", "--model", str(tiny_dir), "--task", "shakespeare",
               "--max-length", "32", "--max-steps", "2", "--batch-size", "2", "--max-train", "8", "--max-eval", "4",
               "--every-nth-block", "2", "--output-dir", str(cmp)])
    assert rc == 0, capsys.readouterr()
    md = (cmp / "results.md").read_text()
    assert "perplexity" in md and "(causal LM)" in md and (cmp / "comparison.png").is_file()
    assert "--every-nth-block 2" in (cmp / "sparsegrad-s0" / "run.log").read_text()


# ------------------------------------------------------------------------------------------------- real SmolLM2
@pytest.mark.slow
def test_smollm2_bbc_instruct_two_steps(smollm2_cache, tmp_path, monkeypatch):
    from sparsegrad.finetune.models import smollm2_dir

    monkeypatch.setenv("SPARSEGRAD_CACHE", str(smollm2_cache))
    smollm2_dir(smollm2_cache)
    m = finetune(model="smollm2", task="bbc-instruct", method="sparsegrad", max_length=64, batch_size=2,
                 max_steps=2, calibration_steps=1, max_train=4, max_eval=2, every_nth_block=15,
                 output_dir=str(tmp_path / "run"), progress=False, verbose=False)
    assert m["layers_to_transform"] == [0, 15] and m["mlp_matrices"] == 6 and m["train_steps"] == 2
    assert set(m["bases_report"]) == {f"model.layers.*.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert 0.0 <= m["eval_exact_match"] <= 1.0 and 0 < m["eval_loss"] < 20
    assert m["prompt_format"] == "chat_template" and m["truncated_examples"] > 0
