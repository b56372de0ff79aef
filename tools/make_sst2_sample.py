"""Writes qlit's bundled SST-2 sample: synthetic movie-review phrases in the hub schema (idx, sentence, label).

The rows are generated from templates written for qlit, not copied from SST-2. Run from the repository root:
``python tools/make_sst2_sample.py``.
"""

import json
import random
from pathlib import Path

POSITIVE = [
    "wonderful",
    "moving",
    "funny",
    "brilliant",
    "charming",
    "gripping",
    "delightful",
    "warm",
    "clever",
    "beautiful",
    "thoughtful",
    "fresh",
    "touching",
    "smart",
    "lively",
]
NEGATIVE = [
    "dull",
    "tedious",
    "clumsy",
    "boring",
    "lifeless",
    "messy",
    "shallow",
    "bland",
    "tiresome",
    "flat",
    "pointless",
    "stale",
    "awkward",
    "weak",
    "forgettable",
]
SUBJECTS = [
    "the film",
    "this movie",
    "the story",
    "the script",
    "the cast",
    "the director's work",
    "the ending",
    "the acting",
    "the plot",
    "the soundtrack",
    "every scene",
    "the dialogue",
]
TEMPLATES = [
    "{s} is {a} .",
    "{s} feels {a} from start to finish .",
    "a {a} picture , and {s} shows it .",
    "{s} turns out {a} and {b} .",
    "what a {a} experience ; {s} is {b} .",
    "{s} is simply {a} .",
]


def rows(n: int, rng: random.Random, start: int) -> list[dict]:
    out = []
    for i in range(n):
        label = rng.randint(0, 1)
        words = POSITIVE if label else NEGATIVE
        a, b = rng.sample(words, 2)
        sentence = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=a, b=b)
        out.append({"idx": start + i, "sentence": sentence, "label": label})
    return out


def main() -> None:
    rng = random.Random(20261122)
    target = Path("qlit/data/samples/sst2")
    target.mkdir(parents=True, exist_ok=True)
    for split, n in [("train", 320), ("validation", 80)]:
        with open(target / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows(n, rng, 0):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
