"""Writes qlit's bundled pricer sample: synthetic product listings in the hub schema of ``ed-donner/pricer-data``
(columns ``text`` and ``price``; splits ``train`` and ``test``).

As on the hub, a train ``text`` is ``"How much does this cost to the nearest dollar?\\n\\n<description>\\n\\nPrice is
$<round(price)>.00"``, while a test ``text`` stops right after ``"Price is $"`` (the model has to write the number);
``price`` is the unrounded float in both splits. Prices are derived from each product's category and features (size,
power, pack count, warranty...), so they are learnable, and range over about $5 to $900.

The brands, products and prices are invented from templates written for qlit, not copied from pricer-data. Run from
the repository root: ``python tools/make_pricer_sample.py``.
"""

import json
import random
from pathlib import Path

QUESTION = "How much does this cost to the nearest dollar?"
PREFIX = "Price is $"
BRANDS = [
    "Norvik",
    "Tallis",
    "Brightwell",
    "Kestrel Works",
    "Aurelo",
    "Mendel & Co",
    "Quillon",
    "Farrow",
    "Ostra",
    "Velden",
]
# The hub's test texts end at "Price is $"; set this to True to keep the price in test texts as well.
TEST_TEXT_HAS_PRICE = False
CENTS = [0.99, 0.95, 0.49, 0.0, 0.29, 0.79, 0.89]


def cable(rng: random.Random) -> tuple[str, str, float]:
    length, pack = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    watts = rng.choice([15, 60, 100])
    title = f"USB-C to USB-C Charging Cable, {length} m, {pack}-Pack"
    body = (
        f"Braided nylon cable that supports {watts} W fast charging and 480 Mbps data transfer. "
        f"Reinforced connectors rated for 10,000 bends. Works with phones, tablets and laptops."
    )
    return title, body, 4.0 + 2.5 * length * pack + watts * 0.05


def bottle(rng: random.Random) -> tuple[str, str, float]:
    ml = rng.choice([500, 750, 1000])
    insulated = rng.random() < 0.6
    kind = "Insulated Stainless Steel" if insulated else "BPA-Free Plastic"
    title = f"{kind} Water Bottle, {ml} ml, Leak-Proof Lid"
    extra = "Double wall vacuum keeps drinks cold for 24 hours." if insulated else "Lightweight and dishwasher safe."
    return (
        title,
        f"{extra} Wide mouth for ice cubes, carry loop, fits most cup holders.",
        (6.0 + ml * 0.008 + (14.0 if insulated else 0.0)),
    )


def earbuds(rng: random.Random) -> tuple[str, str, float]:
    hours = rng.choice([20, 30, 40])
    anc = rng.random() < 0.5
    title = f"Wireless Earbuds {'with Active Noise Cancelling' if anc else 'Bluetooth 5.3'}, {hours} h Playtime"
    body = (
        f"Charging case gives {hours} hours of total playtime. IPX{rng.choice([4, 5, 7])} water resistance, "
        f"touch controls and two microphones for clear calls."
    )
    return title, body, 15.0 + hours * 0.9 + (45.0 if anc else 0.0)


def chair(rng: random.Random) -> tuple[str, str, float]:
    mesh = rng.random() < 0.5
    lumbar = rng.random() < 0.5
    kg = rng.choice([110, 135, 150])
    title = f"Ergonomic Office Chair, {'Breathable Mesh' if mesh else 'Padded Fabric'} Back, {kg} kg Capacity"
    body = (
        f"Adjustable seat height and tilt lock. {'Built-in adjustable lumbar support. ' if lumbar else ''}"
        f"Five-wheel nylon base with smooth casters. Easy assembly in about 20 minutes."
    )
    return title, body, 70.0 + (40.0 if mesh else 0.0) + (35.0 if lumbar else 0.0) + (kg - 110) * 1.2


def drill(rng: random.Random) -> tuple[str, str, float]:
    volts, batteries = rng.choice([12, 18, 20]), rng.choice([1, 2])
    brushless = rng.random() < 0.5
    motor = "Brushless" if brushless else "Brushed"
    title = f"{volts}V Cordless Drill Driver Kit, {motor} Motor, {batteries} Batter{'ies' if batteries == 2 else 'y'}"
    body = (
        f"Two-speed gearbox, 13 mm keyless chuck and LED work light. Includes {batteries} x 2.0 Ah battery, "
        f"charger and carry bag."
    )
    return title, body, 30.0 + volts * 2.5 + batteries * 25.0 + (40.0 if brushless else 0.0)


def vacuum(rng: random.Random) -> tuple[str, str, float]:
    pa, mop, station = rng.choice([2000, 4000, 6000]), rng.random() < 0.5, rng.random() < 0.3
    extras = (", with Mopping" if mop else "") + (", Self-Empty Base" if station else "")
    title = f"Robot Vacuum Cleaner, {pa} Pa Suction{extras}"
    body = (
        f"Laser navigation maps every room and avoids stairs. Runs up to {rng.choice([90, 120, 150])} minutes and "
        f"returns to charge on its own. App and voice control."
    )
    return title, body, 120.0 + pa * 0.04 + (60.0 if mop else 0.0) + (180.0 if station else 0.0)


def espresso(rng: random.Random) -> tuple[str, str, float]:
    bar, grinder = rng.choice([15, 19, 20]), rng.random() < 0.5
    title = f"Espresso Machine, {bar} Bar Pump{', Built-in Conical Burr Grinder' if grinder else ''}, Milk Frother"
    body = (
        f"Heats up in 40 seconds. Steam wand for lattes and cappuccinos, {rng.choice([1.2, 1.5, 1.8])} litre "
        f"removable water tank and stainless steel housing."
    )
    return title, body, 90.0 + bar * 6.0 + (220.0 if grinder else 0.0)


def monitor(rng: random.Random) -> tuple[str, str, float]:
    inch, res, hz = rng.choice([24, 27, 32]), rng.choice(["1080p", "1440p", "4K"]), rng.choice([60, 144, 165])
    title = f"{inch}-Inch {res} Monitor, {hz} Hz, IPS Panel"
    body = (
        f"Thin bezels, HDMI and DisplayPort inputs, tilt-adjustable stand and VESA mount. "
        f"{'Adaptive sync for smooth gaming. ' if hz > 60 else ''}Eye-care flicker-free backlight."
    )
    return title, body, 40.0 + inch * 3.0 + {"1080p": 0.0, "1440p": 70.0, "4K": 180.0}[res] + (hz - 60) * 0.6


def guitar(rng: random.Random) -> tuple[str, str, float]:
    solid, pickup = rng.random() < 0.5, rng.random() < 0.5
    top = "Solid Spruce" if solid else "Laminated"
    title = f"Full Size Acoustic Guitar, {top} Top{', with Pickup' if pickup else ''}"
    body = (
        f"Dreadnought body with mahogany back and sides, rosewood fingerboard and steel strings. "
        f"Includes gig bag, strap and {rng.choice([3, 5, 10])} picks."
    )
    return title, body, 85.0 + (120.0 if solid else 0.0) + (60.0 if pickup else 0.0)


def notebook(rng: random.Random) -> tuple[str, str, float]:
    pack, pages = rng.choice([1, 3, 6]), rng.choice([80, 120, 200])
    title = f"A5 Dotted Notebook, {pages} Pages, Pack of {pack}"
    body = "Thick 100 gsm paper with no ink bleed, lay-flat binding, ribbon bookmark and elastic closure."
    return title, body, 3.0 + pack * pages * 0.025


def scooter(rng: random.Random) -> tuple[str, str, float]:
    km, watts = rng.choice([20, 35, 50]), rng.choice([250, 350, 500])
    title = f"Electric Scooter for Adults, {watts} W Motor, {km} km Range, Foldable"
    body = (
        f"Top speed 25 km/h, {rng.choice([8.5, 10])}-inch tyres, front and rear brakes and LED headlight. "
        f"Folds in 3 seconds for carrying."
    )
    return title, body, 180.0 + km * 6.0 + watts * 0.5


def lamp(rng: random.Random) -> tuple[str, str, float]:
    modes, usb = rng.choice([3, 5]), rng.random() < 0.5
    title = f"LED Desk Lamp, {modes} Colour Modes, Dimmable{', USB Charging Port' if usb else ''}"
    body = "Touch control, flexible gooseneck arm and memory function that keeps your last brightness setting."
    return title, body, 12.0 + modes * 2.0 + (8.0 if usb else 0.0)


MAKERS = [cable, bottle, earbuds, chair, drill, vacuum, espresso, monitor, guitar, notebook, scooter, lamp]


def make_row(rng: random.Random, test: bool) -> dict:
    title, body, base = rng.choice(MAKERS)(rng)
    brand = rng.choice(BRANDS)
    warranty = rng.choice([1, 2, 3])
    price = max(5.0, min(899.0, base * rng.uniform(0.92, 1.08) + (warranty - 1) * base * 0.05))
    price = round(int(price) + rng.choice(CENTS), 2)
    description = f"{brand} {title}\n{body} Brand: {brand}. Warranty: {warranty} year{'s' if warranty > 1 else ''}."
    answer = "" if test and not TEST_TEXT_HAS_PRICE else f"{round(price)}.00"
    return {"text": f"{QUESTION}\n\n{description}\n\n{PREFIX}{answer}", "price": price}


def main() -> None:
    rng = random.Random(20261126)
    target = Path("qlit/data/samples/pricer")
    target.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, n in [("train", 120), ("test", 40)]:
        rows: list[dict] = []
        while len(rows) < n:
            row = make_row(rng, split == "test")
            description = row["text"].split("\n\n")[1]
            if description not in seen:
                seen.add(description)
                rows.append(row)
        with open(target / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
