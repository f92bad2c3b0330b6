"""Shared test builders: ONE tiny-model builder for both task kinds (in memory, `tiny_model`; saved like a real
checkpoint with a tokenizer, `tiny_model_dir`), tiny learnable data, and ONE matrix of runs (`RUNS`) that the engine
tests (round trip, resume, accumulation, two processes, refusals) all run over."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

CLASSIFIER, CAUSAL_LM = "classifier", "causal-lm"

# (task kind, method, support): every method on both kinds, the sparse ones with a fixed support too.
RUNS = [
    (CLASSIFIER, "sparsegrad", "dynamic"),
    (CLASSIFIER, "sparsegrad", "fixed"),
    (CLASSIFIER, "meprop", "dynamic"),
    (CLASSIFIER, "lora", "dynamic"),
    (CLASSIFIER, "full", "dynamic"),
    (CAUSAL_LM, "sparsegrad", "dynamic"),
    (CAUSAL_LM, "sparsegrad", "fixed"),
    (CAUSAL_LM, "meprop", "dynamic"),
    (CAUSAL_LM, "lora", "dynamic"),
    (CAUSAL_LM, "full", "dynamic"),
]

WORDS = {0: "goal match team coach league striker".split(), 1: "bank market shares profit economy trade".split(),
         2: "film actor music award album star".split()}
FILL = "the a of and to in is it on for with".split()
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def run_id(run: tuple[str, str, str]) -> str:
    return "-".join(run)


# ------------------------------------------------------------------------------------------------- models
def tiny_model(kind: str, *, seed: int = 0, layers: int = 2, vocab: int | None = None, num_labels: int = 3,
               dropout: float = 0.0, max_positions: int = 64, head: bool = True, dtype=torch.float32, **config):
    """A random 2-block (hidden 32) BERT classifier (``classifier``; ``head=False``: the bare encoder) or LLaMA
    causal LM (``causal-lm``), weights fixed by ``seed``, in eval mode."""
    torch.manual_seed(seed)
    if kind == CLASSIFIER:
        from transformers import BertConfig, BertForSequenceClassification, BertModel

        cfg = BertConfig(vocab_size=vocab or 120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=max_positions, num_labels=num_labels,
                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **config)
        model = BertForSequenceClassification(cfg) if head else BertModel(cfg)
    elif kind == CAUSAL_LM:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=vocab or 128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                          attention_dropout=dropout, **config)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return model.to(dtype).eval()


def make_tiny_bert(seed: int = 0, layers: int = 2, num_labels: int = 3):
    """The core tests' tiny BERT classifier (vocabulary 120, no dropout)."""
    return tiny_model(CLASSIFIER, seed=seed, layers=layers, num_labels=num_labels)


def make_tiny_llama(seed: int = 0, layers: int = 2):
    """The core tests' tiny LLaMA (vocabulary 128)."""
    return tiny_model(CAUSAL_LM, seed=seed, layers=layers)


def bert_batches(n: int, seed: int = 0, batch: int = 4, length: int = 12, num_labels: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 120, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length - 3:] = 0  # one padded row: exercises zero output-gradient rows
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, num_labels, (batch,), generator=g)})
    return out


def llama_batches(n: int, seed: int = 0, batch: int = 2, length: int = 10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (batch, length), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def word_tokenizer():
    """A WordPiece tokenizer over the topic and filler words of `make_csv`."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILL + [w for ws in WORDS.values() for w in ws]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def chat_tokenizer():
    """A byte-level BPE (vocabulary 512) trained on the BBC instruction and a few articles, with ChatML specials
    and a ChatML chat template: a real transformers tokenizer, made in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sparsegrad.finetune import lm
    from sparsegrad.finetune.data import load_task

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = load_task("bbc", max_train=40, max_eval=5).train_texts
    tok.train_from_iterator([lm.BBC_INSTRUCTION] * 20 + texts + ["user assistant sport tech"] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_dir(kind: str, path, *, seed: int = 0, dropout: float | None = None, layers: int | None = None,
                   tokenizer=None) -> Path:
    """`tiny_model` with a tokenizer, saved like a real checkpoint: a BERT encoder (no head: finetune adds one)
    with `word_tokenizer` (dropout 0.1 unless given), or a 4-block LLaMA with `chat_tokenizer` (dropout 0)."""
    path = Path(path)
    if kind == CLASSIFIER:
        tok = tokenizer or word_tokenizer()
        model = tiny_model(kind, seed=seed, layers=layers or 2, vocab=len(tok), head=False,
                           dropout=0.1 if dropout is None else dropout)
    else:
        tok = tokenizer or chat_tokenizer()
        model = tiny_model(kind, seed=seed, layers=layers or 4, vocab=len(tok), max_positions=256,
                           dropout=dropout or 0.0, tie_word_embeddings=False, pad_token_id=2, bos_token_id=1,
                           eos_token_id=2)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


# ------------------------------------------------------------------------------------------------- data
def make_csv(path, n=60, seed=0) -> Path:
    """Three topics whose texts carry topic words: learnable, so accuracy can move."""
    rng = random.Random(seed)
    names = ["sport", "business", "arts"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            y = i % 3
            words = [rng.choice(WORDS[y]) for _ in range(3)] + [rng.choice(FILL) for _ in range(rng.randint(3, 12))]
            rng.shuffle(words)
            w.writerow([" ".join(words) + f" {i}", names[y]])
    return Path(path)


def make_pairs(path, n=40, seed=0) -> Path:
    """Prompt/response pairs (JSON Lines) of varying length: a topic word answers a list of its words."""
    rng = random.Random(seed)
    names = ["sport", "business", "arts"]
    with open(path, "w") as fh:
        for i in range(n):
            y = i % 3
            words = [rng.choice(WORDS[y]) for _ in range(rng.randint(2, 9))]
            fh.write(json.dumps({"prompt": f"{' '.join(words)} {i}: which topic?", "response": names[y]}) + "\n")
    return Path(path)


def task_data(kind: str, folder) -> Path:
    """The training file of a kind's runs."""
    folder = Path(folder)
    return make_csv(folder / "train.csv") if kind == CLASSIFIER else make_pairs(folder / "pairs.jsonl")


def finetune_argv(kind: str, model_dir, train_file, method: str, support: str, *, steps: int = 4,
                  batch_size: int = 4, **flags) -> list[str]:
    """A short `sparsegrad finetune` command line of one run of the matrix."""
    argv = ["finetune", "--model", str(model_dir), "--train-file", str(train_file), "--method", method,
            "--max-length", "32" if kind == CLASSIFIER else "48", "--max-steps", str(steps), "--batch-size",
            str(batch_size), "--density", "0.05", "--no-progress"]
    if method in ("sparsegrad", "meprop"):
        argv += ["--support", support]
    if method == "sparsegrad":
        argv += ["--calibration-steps", "1"]
    for flag, value in flags.items():
        argv += [f"--{flag.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


# ------------------------------------------------------------------------------------------------- run folders
def losses(run: Path) -> list[float]:
    with open(Path(run) / "loss.csv", newline="") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((Path(run) / "adapter").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def max_param_diff(a: Path, b: Path) -> float:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert set(ta) == set(tb)
    worst = 0.0
    for k in ta:
        assert ta[k].shape == tb[k].shape, k
        worst = max(worst, float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0)
    return worst
