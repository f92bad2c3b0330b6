"""How learnable the demo task is, without fine-tuning: a linear classifier (scikit-learn's logistic regression) on
TF-IDF word n-grams, and on MiniLM-L6's frozen features (its [CLS] pooler output, which the fine-tuned classifier's
head reads, and the mean of the last hidden states, which the sentence-transformer was trained with). Trained on
train.csv, scored on eval.csv at two regularisation strengths each (so the better of the two is an optimistic
ceiling: it was read on eval); the majority-class rate beside them.

    pip install scikit-learn   # not a dependency of sparsegrad
    python docs/quality/demo/baselines.py docs/quality/demo
"""

import csv
import sys
from collections import Counter
from pathlib import Path

import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel, AutoTokenizer

from sparsegrad.finetune.models import resolve_model


def read(path: Path) -> tuple[list[str], list[str]]:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def features(texts: list[str], tok, model) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"pooler": [], "mean": []}
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            batch = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**batch)
            mask = batch["attention_mask"].unsqueeze(-1)
            out["pooler"].append(hidden.pooler_output)
            out["mean"].append((hidden.last_hidden_state * mask).sum(1) / mask.sum(1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def accuracy(clf, x_train, y_train, x_eval, y_eval) -> float:
    clf.fit(x_train, y_train)
    return sum(p == y for p, y in zip(clf.predict(x_eval), y_eval)) / len(y_eval)


def main(folder: str) -> None:
    torch.manual_seed(0)
    x_train, y_train = read(Path(folder) / "train.csv")
    x_eval, y_eval = read(Path(folder) / "eval.csv")
    majority = Counter(y_eval).most_common(1)[0][1] / len(y_eval)
    print(f"{len(y_train)} train / {len(y_eval)} eval rows; majority-class rate on eval {majority:.4f}")
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(x_train)
    for c in (1.0, 10.0):
        acc = accuracy(LogisticRegression(C=c, max_iter=5000, class_weight="balanced"), tfidf.transform(x_train),
                       y_train, tfidf.transform(x_eval), y_eval)
        print(f"tf-idf 1-2 grams, logistic regression C={c:g} (balanced): accuracy {acc:.4f}")
    path = resolve_model("minilm")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    f_train, f_eval = features(x_train, tok, model), features(x_eval, tok, model)
    for kind in ("pooler", "mean"):
        for c in (0.1, 1.0):
            acc = accuracy(LogisticRegression(C=c, max_iter=5000), f_train[kind], y_train, f_eval[kind], y_eval)
            print(f"frozen MiniLM-L6 {kind} features, logistic regression C={c:g}: accuracy {acc:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))
