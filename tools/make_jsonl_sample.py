"""Writes qlit's bundled samples of its generic JSONL format for users' own data, in two layouts:

* ``qlit/data/samples/jsonl/completion/{train,validation}.jsonl``: rows ``{"prompt": str, "completion": str}``; the
  prompt ends with ``"\\nAnswer:"`` and the completion starts with a space, so ``prompt + completion`` reads naturally.
* ``qlit/data/samples/jsonl/chat/{train,validation}.jsonl``: rows ``{"messages": [{"role", "content"}, ...]}`` with
  roles ``system`` (optional, first), ``user`` and ``assistant``, always ending with an assistant turn.

The tasks are simple invented instructions (convert a temperature, capitalise a word, name the opposite, ...)
generated from templates written for qlit. Run from the repository root: ``python tools/make_jsonl_sample.py``.
"""

import json
import random
from pathlib import Path

WORDS = [
    "apple",
    "river",
    "garden",
    "pencil",
    "window",
    "rocket",
    "forest",
    "candle",
    "planet",
    "bridge",
    "tiger",
    "violin",
    "marble",
    "lantern",
    "harbor",
    "meadow",
    "button",
    "castle",
    "silver",
    "puzzle",
]
OPPOSITES = [
    ("hot", "cold"),
    ("up", "down"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("light", "dark"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("big", "small"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("push", "pull"),
    ("begin", "end"),
    ("near", "far"),
    ("old", "new"),
    ("high", "low"),
    ("thick", "thin"),
]
PLURALS = [
    ("cat", "cats"),
    ("box", "boxes"),
    ("city", "cities"),
    ("child", "children"),
    ("mouse", "mice"),
    ("leaf", "leaves"),
    ("bus", "buses"),
    ("tooth", "teeth"),
    ("knife", "knives"),
    ("baby", "babies"),
    ("dish", "dishes"),
    ("man", "men"),
    ("foot", "feet"),
    ("wolf", "wolves"),
    ("story", "stories"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a friendly tutor who gives short, correct answers.",
]


def task(rng: random.Random) -> tuple[str, str]:
    """One (instruction, answer) pair from a random task family."""
    kind = rng.randrange(8)
    if kind == 0:
        c = rng.randrange(-20, 105, 5)
        f = c * 9 // 5 + 32
        q = rng.choice([f"Convert {c} degrees Celsius to Fahrenheit.", f"What is {c}°C in Fahrenheit?"])
        return q, f"{c} degrees Celsius is {f} degrees Fahrenheit."
    if kind == 1:
        w = rng.choice(WORDS)
        q = rng.choice([f"Capitalise the word '{w}'.", f"Write '{w}' with a capital first letter."])
        return q, w.capitalize()
    if kind == 2:
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        q = rng.choice([f"What is the opposite of '{a}'?", f"Name the opposite of the word '{a}'."])
        return q, f"The opposite of '{a}' is '{b}'."
    if kind == 3:
        s, p = rng.choice(PLURALS)
        q = rng.choice([f"What is the plural of '{s}'?", f"Give the plural form of '{s}'."])
        return q, f"The plural of '{s}' is '{p}'."
    if kind == 4:
        w = rng.choice(WORDS)
        q = rng.choice([f"Reverse the letters of '{w}'.", f"Spell '{w}' backwards."])
        return q, w[::-1]
    if kind == 5:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        q = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}."])
        return q, f"{a} + {b} = {a + b}."
    if kind == 6:
        w = rng.choice(WORDS)
        q = rng.choice([f"How many letters are in the word '{w}'?", f"Count the letters in '{w}'."])
        return q, f"'{w}' has {len(w)} letters."
    i = rng.randrange(7)
    q = rng.choice([f"Which day comes after {DAYS[i]}?", f"If today is {DAYS[i]}, what day is tomorrow?"])
    return q, f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."


def completion_row(rng: random.Random) -> dict:
    q, a = task(rng)
    return {"prompt": f"{q}\nAnswer:", "completion": f" {a}"}


def chat_row(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
    for _ in range(1 if rng.random() < 0.75 else 2):
        q, a = task(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def write(target: Path, make, rng: random.Random) -> None:
    target.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, n in [("train", 120), ("validation", 40)]:
        rows: list[dict] = []
        while len(rows) < n:
            row = make(rng)
            key = json.dumps(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
        with open(target / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(20261127)
    write(Path("qlit/data/samples/jsonl/completion"), completion_row, rng)
    write(Path("qlit/data/samples/jsonl/chat"), chat_row, rng)


if __name__ == "__main__":
    main()
