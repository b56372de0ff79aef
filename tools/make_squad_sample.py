"""Writes qlit's bundled SQuAD sample: synthetic reading-comprehension rows in the hub schema of ``rajpurkar/squad``.

Columns: ``id`` (24 hex characters), ``title``, ``context``, ``question`` and
``answers = {"text": [str], "answer_start": [int]}``, where ``context[start:start + len(text)] == text`` for every
answer. Validation rows carry up to three gold answers (the same span with or without an article or a leading word,
or a shorter span), as the real validation split does.

Every fact is invented (fictional towns, rivers, inventors and years), and the rows are generated from templates
written for qlit, not copied from SQuAD. Run from the repository root: ``python tools/make_squad_sample.py``.
"""

import json
import random
from pathlib import Path

STEMS = [
    "Bal",
    "Cor",
    "Dun",
    "Ester",
    "Fen",
    "Gal",
    "Hal",
    "Istra",
    "Jor",
    "Kel",
    "Lun",
    "Mar",
    "Nor",
    "Orr",
    "Pell",
    "Quen",
    "Ros",
    "Sel",
    "Tam",
    "Ull",
    "Ver",
    "Wyn",
    "Yar",
    "Zel",
    "Brem",
    "Caul",
    "Dray",
    "Elm",
    "Ferr",
    "Gorm",
]
TOWN_ENDS = ["ford", "mere", "wick", "brook", "dale", "haven", "stead", "holm", "ton", "bury", "gate", "moor"]
RIVER_ENDS = ["a", "en", "is", "ow", "ane", "ell", "ith", "or"]
FIRST = [
    "Alma",
    "Bertil",
    "Casimir",
    "Delphine",
    "Edric",
    "Fenna",
    "Gustav",
    "Hilde",
    "Ivo",
    "Jorunn",
    "Konrad",
    "Liesel",
    "Matthias",
    "Nadia",
    "Oskar",
    "Petra",
    "Rune",
    "Sabine",
    "Tobias",
    "Ulla",
    "Viktor",
    "Wanda",
]
SURNAME_ENDS = ["sen", "berg", "ova", "ani", "ley", "mark", "strom", "vik", "ardt", "quist"]
SHE = {"Alma", "Delphine", "Fenna", "Hilde", "Jorunn", "Liesel", "Nadia", "Petra", "Sabine", "Ulla", "Wanda"}
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
PRODUCTS = [
    "blue cheese",
    "copper kettles",
    "woollen blankets",
    "apple cider",
    "glass beads",
    "clay pipes",
    "smoked trout",
    "linen cloth",
    "honey cakes",
    "wooden clocks",
    "rope",
    "salt",
]
BUILDINGS = ["Old Mill", "Corn Exchange", "Grey Chapel", "Toll House", "Bell Tower", "Weavers' Hall", "Stone Granary"]
JOBS = ["wool merchant", "ferryman", "stonemason", "blacksmith", "brewer", "miller", "surveyor", "fisherman"]
INVENTIONS = [
    ("pattern loom", "weaving patterned cloth"),
    ("tide clock", "predicting high water"),
    ("seed drill", "planting grain in straight rows"),
    ("lamp regulator", "keeping a gas flame steady"),
    ("folding press", "printing small pamphlets"),
    ("ice saw", "cutting blocks from frozen lakes"),
    ("wind gauge", "measuring the speed of wind"),
    ("brick mould", "shaping bricks of equal size"),
    ("rail clamp", "holding tracks in place"),
    ("water filter", "cleaning drinking water"),
]
GOODS = ["sewing machines", "bicycles", "pocket watches", "farm tools", "printing presses", "lanterns", "barometers"]
RANGES = ["Hollin Hills", "Greywater Mountains", "Sarn Uplands", "Kestle Fells", "Morrow Heights", "Tarn Ridge"]
SEAS = ["Gulf of Aster", "Northmere Sea", "Bay of Calder", "Strait of Orrin", "Pellan Sea"]
FISH = ["trout", "eels", "salmon", "pike", "perch", "carp"]


def town(rng: random.Random) -> str:
    return rng.choice(STEMS) + rng.choice(TOWN_ENDS)


def river_name(rng: random.Random) -> str:
    return rng.choice(STEMS) + rng.choice(RIVER_ENDS)


def person(rng: random.Random) -> tuple[str, str, str]:
    first = rng.choice(FIRST)
    surname = rng.choice(STEMS) + rng.choice(SURNAME_ENDS)
    return first, surname, "She" if first in SHE else "He"


def town_doc(rng: random.Random) -> tuple[str, list[str], list[tuple]]:
    """Sentences and (question, sentence index, answer variants) for an invented town."""
    name, riv = town(rng), river_name(rng)
    first, surname, _ = person(rng)
    founded = rng.randint(1150, 1790)
    built = founded + rng.randint(20, 200)
    pop = f"{rng.randint(2, 60)},{rng.randint(0, 9)}00"
    month, product, building, job = rng.choice(MONTHS), rng.choice(PRODUCTS), rng.choice(BUILDINGS), rng.choice(JOBS)
    sentences = [
        rng.choice(
            [
                f"{name} is a market town on the banks of the {riv} River.",
                f"{name} is a small town that lies beside the {riv} River.",
            ]
        ),
        rng.choice(
            [
                f"It was founded in {founded} by {first} {surname}, a {job}.",
                f"The town was founded in {founded} by a {job} named {first} {surname}.",
            ]
        ),
        rng.choice(
            [
                f"{name} is known for its {product}, sold at a fair held every {month}.",
                f"Every {month} the town holds a fair where its famous {product} is sold.",
            ]
        ),
        f"At the last census the population was about {pop}.",
        rng.choice(
            [
                f"The oldest building in {name} is the {building}, completed in {built}.",
                f"The {building}, completed in {built}, is the oldest building in {name}.",
            ]
        ),
    ]
    qas = [
        (
            rng.choice([f"Which river flows past {name}?", f"On the banks of which river is {name}?"]),
            0,
            [f"the {riv} River", f"{riv} River", riv],
        ),
        (
            rng.choice([f"When was {name} founded?", f"In what year was {name} founded?"]),
            1,
            [str(founded), f"in {founded}"],
        ),
        (rng.choice([f"Who founded {name}?", f"Who was the founder of {name}?"]), 1, [f"{first} {surname}", surname]),
        (f"What was the occupation of {first} {surname}?", 1, [job, f"a {job}"]),
        (rng.choice([f"What is {name} known for?", f"What is sold at the fair in {name}?"]), 2, [product]),
        (f"In which month is the fair held in {name}?", 2, [month, f"every {month}"]),
        (f"What was the population of {name} at the last census?", 3, [pop, f"about {pop}"]),
        (f"What is the oldest building in {name}?", 4, [f"the {building}", building]),
        (f"When was the {building} completed?", 4, [str(built), f"in {built}"]),
    ]
    return name, sentences, qas


def inventor_doc(rng: random.Random) -> tuple[str, list[str], list[tuple]]:
    first, surname, pron = person(rng)
    born, city, shown_in = rng.randint(1760, 1900), town(rng), town(rng)
    shown = born + rng.randint(22, 45)
    (invention, purpose), goods = rng.choice(INVENTIONS), rng.choice(GOODS)
    company = f"{surname} {rng.choice(['Works', 'Company', 'Brothers', 'Foundry'])}"
    closed = shown + rng.randint(15, 70)
    sentences = [
        f"{first} {surname} was an engineer born in {city} in {born}.",
        rng.choice(
            [
                f"{pron} is best remembered for inventing the {invention}, a device for {purpose}.",
                f"{pron} is remembered today as the inventor of the {invention}, a device for {purpose}.",
            ]
        ),
        f"The first working model was shown in {shown_in} in {shown}.",
        rng.choice(
            [
                f"{surname} later founded the {company}, which made {goods} until {closed}.",
                f"Later {surname} started the {company}, a firm that built {goods} until {closed}.",
            ]
        ),
    ]
    qas = [
        (
            rng.choice([f"What did {first} {surname} invent?", f"Which device is {surname} remembered for?"]),
            1,
            [f"the {invention}", invention],
        ),
        (f"Where was {first} {surname} born?", 0, [city, f"in {city}"]),
        (f"In what year was {first} {surname} born?", 0, [str(born)]),
        (f"What was the {invention} used for?", 1, [purpose, f"a device for {purpose}"]),
        (f"Where was the first working model of the {invention} shown?", 2, [shown_in, f"in {shown_in}"]),
        (f"When was the first working model of the {invention} shown?", 2, [str(shown), f"in {shown}"]),
        (f"Which firm did {surname} found?", 3, [f"the {company}", company]),
        (f"What did the {company} make?", 3, [goods]),
    ]
    return f"{first}_{surname}", sentences, qas


def river_doc(rng: random.Random) -> tuple[str, list[str], list[tuple]]:
    riv, trib, mouth_town = river_name(rng), river_name(rng), town(rng)
    while trib == riv:
        trib = river_name(rng)
    hills, sea, fish = rng.choice(RANGES), rng.choice(SEAS), rng.choice(FISH)
    length = rng.randint(40, 900)
    first, surname, _ = person(rng)
    mapped = rng.randint(1500, 1880)
    sentences = [
        rng.choice(
            [
                f"The {riv} River rises in the {hills} and flows {length} kilometres to the {sea}.",
                f"Rising in the {hills}, the {riv} River runs for {length} kilometres before reaching the {sea}.",
            ]
        ),
        f"Its largest tributary is the {trib}.",
        f"The port of {mouth_town} stands at its mouth.",
        f"The river was first mapped by {first} {surname} in {mapped}.",
        rng.choice([f"Its waters are famous for {fish}.", f"Anglers visit the river to catch {fish}."]),
    ]
    qas = [
        (f"Where does the {riv} River rise?", 0, [f"the {hills}", hills]),
        (
            rng.choice([f"How long is the {riv} River?", f"How many kilometres does the {riv} River flow?"]),
            0,
            [f"{length} kilometres", str(length)],
        ),
        (f"Into which sea does the {riv} River flow?", 0, [f"the {sea}", sea]),
        (f"What is the largest tributary of the {riv} River?", 1, [f"the {trib}", trib]),
        (f"Which port stands at the mouth of the {riv} River?", 2, [mouth_town]),
        (f"Who first mapped the {riv} River?", 3, [f"{first} {surname}", surname]),
        (f"When was the {riv} River first mapped?", 3, [str(mapped), f"in {mapped}"]),
        (f"Which fish is the {riv} River famous for?", 4, [fish]),
    ]
    return f"{riv}_River", sentences, qas


def rows(n: int, rng: random.Random, multi: bool, seen: set[str]) -> list[dict]:
    """``n`` rows, several questions per context; ``seen`` keeps titles unique across splits."""
    out: list[dict] = []
    makers = [town_doc, inventor_doc, river_doc]
    docs = 0
    while len(out) < n:
        title, sentences, qas = makers[docs % 3](rng)
        docs += 1
        if title in seen:
            continue
        seen.add(title)
        context = " ".join(sentences)
        offsets = [sum(len(s) + 1 for s in sentences[:i]) for i in range(len(sentences))]
        for question, idx, variants in rng.sample(qas, min(len(qas), rng.randint(4, 6), n - len(out))):
            found = [t for t in variants if t in sentences[idx]]
            texts = found[: rng.randint(1, min(3, len(found)))] if multi else found[:1]
            starts = [offsets[idx] + sentences[idx].index(t) for t in texts]
            out.append(
                {
                    "id": f"{rng.getrandbits(96):024x}",
                    "title": title,
                    "context": context,
                    "question": question,
                    "answers": {"text": texts, "answer_start": starts},
                }
            )
    return out


def main() -> None:
    rng = random.Random(20261123)
    target = Path("qlit/data/samples/squad")
    target.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, n, multi in [("train", 120, False), ("validation", 40, True)]:
        with open(target / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows(n, rng, multi, seen):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
