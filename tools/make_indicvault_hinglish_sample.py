"""Writes qlit's bundled IndicVault Hinglish sample: synthetic everyday questions and answers in the hub schema of
``maya-research/IndicVault`` (config ``Hinglish``, split ``train``; columns ``question`` and ``response``).

Like the real config, a few rows carry an API error message instead of an answer (``ERROR: No API keys available``,
``No API keys available``, ``Error: rate limit exceeded, please retry``); qlit's loader drops and counts them.

The Hinglish rows are written for qlit from templates and short hand-written answers, not copied from IndicVault. Run
from the repository root: ``python tools/make_indicvault_hinglish_sample.py``.
"""

import json
import random
from pathlib import Path

UNITS = [
    ("kilometre", "metre", 1000, "1 km = 1000 metre"),
    ("ghante", "minute", 60, "har ghante mein 60 minute"),
    ("kilo", "gram", 1000, "1 kilo = 1000 gram"),
    ("din", "ghante", 24, "ek din mein 24 ghante"),
    ("minute", "second", 60, "har minute mein 60 second"),
    ("litre", "millilitre", 1000, "1 litre = 1000 ml"),
]
UNIT_Q = ["{n} {a} mein kitne {b} hote hain?", "Bhai, {n} {a} ko {b} mein convert karo na.", "{n} {a} = kitne {b}?"]
UNIT_A = [
    "{n} {a} mein {m} {b} hote hain, kyunki {rule}. Bas {f} se multiply kar do.",
    "Answer hai {m} {b}. Rule simple hai: {rule}, toh {n} x {f} = {m}.",
]

DISHES = [
    (
        "chai",
        "paani, doodh, chai patti, cheeni aur thoda adrak",
        "Paani mein adrak aur chai patti daal ke 2 minute ubaalo, phir doodh aur cheeni daalo aur ek ubaal aane do. "
        "Chhaan ke garam garam piyo.",
    ),
    (
        "poha",
        "poha, pyaaz, mungphali, rai, haldi aur nimbu",
        "Poha dho ke 5 minute rakh do. Kadhai mein tel, rai, mungphali aur pyaaz bhuno, haldi daalo, phir poha mix karo. "
        "Upar se nimbu nichodo.",
    ),
    (
        "jeera rice",
        "chawal, jeera, ghee aur namak",
        "Chawal 20 minute bhigo do. Ghee mein jeera tadkao, chawal aur double paani daalo, namak daal ke dhak do aur 12 "
        "minute pakao.",
    ),
    (
        "omelette",
        "do ande, pyaaz, hari mirch, namak aur kaali mirch",
        "Ande phento, usme pyaaz, mirch aur namak milao. Tawa garam karke thoda tel lagao, mixture daalo aur dono taraf "
        "se 2 minute sekho.",
    ),
    (
        "nimbu pani",
        "nimbu, thanda paani, cheeni, kaala namak aur pudina",
        "Glass mein ek nimbu ka ras, do chammach cheeni aur chutki bhar kaala namak daalo. Thanda paani mila ke pudina "
        "se sajao.",
    ),
    (
        "dal tadka",
        "arhar dal, tamatar, pyaaz, lehsun, jeera aur ghee",
        "Dal ko haldi aur namak ke saath cooker mein 3 seeti tak pakao. Alag se ghee mein jeera, lehsun, pyaaz aur "
        "tamatar bhuno aur dal mein tadka laga do.",
    ),
    (
        "upma",
        "suji, rai, kadi patta, pyaaz aur hari mirch",
        "Suji ko halka sa bhun lo. Tel mein rai, kadi patta, pyaaz aur mirch daalo, phir paani ubaalo aur suji dheere "
        "dheere chalate hue daalo.",
    ),
    (
        "cold coffee",
        "thanda doodh, coffee powder, cheeni aur ice",
        "Mixer mein ek glass thanda doodh, ek chammach coffee, do chammach cheeni aur thodi ice daal ke 1 minute "
        "blend karo. Bas ready hai.",
    ),
    (
        "khichdi",
        "chawal, moong dal, haldi, namak aur ghee",
        "Chawal aur moong dal barabar lo, dho ke cooker mein haldi, namak aur 4 cup paani ke saath 3 seeti lagao. "
        "Upar se ghee daal ke khao.",
    ),
    (
        "veg sandwich",
        "bread, kheera, tamatar, aloo, hari chutney aur butter",
        "Bread pe butter aur hari chutney lagao, ubla aloo, kheera aur tamatar ke slices rakho, thoda chaat masala "
        "chhidko aur toast kar lo.",
    ),
]
DISH_Q = [
    "{d} kaise banate hain?",
    "Ghar pe {d} banane ka simple tarika batao.",
    "Mujhe {d} banana hai, steps kya hain?",
]
DISH_A = ["{d} ke liye {i} chahiye. {s}", "Simple hai! Pehle {i} ready rakho. {s}"]

WORDS = [
    ("water", "paani"),
    ("friend", "dost"),
    ("book", "kitaab"),
    ("window", "khidki"),
    ("happiness", "khushi"),
    ("tree", "ped"),
    ("river", "nadi"),
    ("morning", "subah"),
    ("market", "bazaar"),
    ("key", "chaabi"),
    ("rain", "baarish"),
    ("moon", "chaand"),
    ("kitchen", "rasoi"),
    ("road", "sadak"),
    ("bird", "chidiya"),
]

ADVICE = [
    (
        ["Raat ko neend nahi aati, kya karun?", "Mujhe late night tak neend nahi aati, koi tips do."],
        "Sone se ek ghanta pehle phone side mein rakh do, room thoda dark aur thanda rakho, aur roz same time pe sone "
        "ki aadat dalo. Shaam ke baad chai-coffee avoid karo.",
    ),
    (
        ["Mere phone ki battery bahut jaldi khatam hoti hai, kya karun?", "Phone ki battery life kaise badhayein?"],
        "Screen brightness kam karo, jo apps background mein chal rahe hain unhe band karo, aur location tabhi on rakho "
        "jab zaroorat ho. Battery saver mode bhi kaafi help karta hai.",
    ),
    (
        ["Exam mein sirf ek hafta bacha hai, tayari kaise karun?", "Last week mein exam ki tayari kaise karein?"],
        "Pehle syllabus ko chhote topics mein baant lo. Roz 2-3 topics revise karo, purane papers solve karo aur raat "
        "ko poori neend lo. Naya topic last din mat shuru karna.",
    ),
    (
        ["Salary aate hi khatam ho jaati hai, paise kaise bachaun?", "Har mahine thode paise save kaise karein?"],
        "Salary aate hi 20 percent alag account mein daal do, phir bache hue paison se kharcha chalao. Har hafte apna "
        "kharcha note karo, pata chalega paisa kahan ja raha hai.",
    ),
    (
        ["Kal mera job interview hai, kaise prepare karun?", "Interview se pehle kya kya taiyari karni chahiye?"],
        "Company ke baare mein 10 minute padh lo, apna resume ek baar zor se bol ke practice karo, aur 'apne baare "
        "mein batao' ka 1 minute ka jawab ready rakho. Time se 15 minute pehle pahuncho.",
    ),
    (
        ["English bolne mein confidence nahi aata, kya karun?", "Apni spoken English kaise improve karun?"],
        "Roz 10 minute English mein khud se baat karo ya apni awaaz record karo. Chhote sentences se shuru karo, "
        "galtiyon se daro mat. English shows subtitles ke saath dekhna bhi helpful hai.",
    ),
    (
        ["Mera laptop bahut slow chal raha hai, kya karun?", "Laptop hang hota hai, koi solution?"],
        "Startup pe chalne wale extra apps band karo, disk mein kam se kam 20 percent jagah khaali rakho aur ek baar "
        "restart karo. Agar phir bhi slow hai toh RAM upgrade ke baare mein socho.",
    ),
    (
        ["Garmi mein hydrated kaise rahein?", "Itni garmi mein paani kam peeta hoon, kya karun?"],
        "Apne paas hamesha paani ki bottle rakho aur har ghante thoda thoda piyo. Nimbu pani, chaach aur tarbooz bhi "
        "ache options hain. Dopahar ki tez dhoop mein bahar jaane se bacho.",
    ),
    (
        ["Subah jaldi kaise uthun?", "Mujhse subah 6 baje utha nahi jaata, tips do."],
        "Alarm ko bed se door rakho taaki uthna pade. Raat ko 15-15 minute pehle sona shuru karo, aur uthte hi parde "
        "khol do, dhoop se neend jaldi jaati hai.",
    ),
    (
        ["Kaam ka stress bahut hai, kaise handle karun?", "Office stress kam karne ke tareeke batao."],
        "Din ke kaam ki list banao aur sabse zaroori teen kaam pehle karo. Har do ghante mein 5 minute ka break lo, "
        "thoda walk karo. Kisi dost se baat karna bhi halka mehsoos karata hai.",
    ),
    (
        ["Mere paudhe sukh rahe hain, kya galti ho rahi hai?", "Ghar ke plants murjha kyun jaate hain?"],
        "Zyada ya bahut kam paani dono nuksaan karte hain. Mitti upar se sookhi lage tabhi paani do, gamle mein neeche "
        "chhed hona chahiye aur paudhe ko roz kuch ghante dhoop milni chahiye.",
    ),
    (
        ["Ghar ka Wi-Fi bahut slow hai, kya karun?", "Wi-Fi speed kaise badhayein?"],
        "Router ko ghar ke beech mein aur thodi oonchai pe rakho, deewar ke peeche nahi. Ek baar router restart karo "
        "aur check karo ki koi aur device bada download toh nahi kar raha.",
    ),
    (
        ["Resume mein kya kya likhna chahiye?", "Pehli job ke liye resume kaise banaun?"],
        "Upar naam aur contact, phir ek line ka objective, education, projects aur skills likho. Resume ek page ka "
        "rakho aur har point action word se shuru karo, jaise 'banaya' ya 'lead kiya'.",
    ),
    (
        ["Ghar pe bina equipment ke workout kaise karun?", "Gym nahi ja sakta, ghar pe exercise batao."],
        "Roz 20 minute: 3 round mein 15 squats, 10 push-ups, 30 second plank aur 20 jumping jacks karo. Shuru mein "
        "dheere karo aur har hafte thoda badhao.",
    ),
    (
        ["Kapde pe chai ka daag lag gaya, kaise hatayein?", "Shirt se chai ka daag kaise nikalun?"],
        "Jaldi se thande paani se dho do, garam paani se daag pakka ho jaata hai. Phir thoda detergent ya nimbu lagake "
        "10 minute chhodo aur halka ragad ke dho lo.",
    ),
    (
        ["Kam budget mein trip kaise plan karein?", "Sasti trip ke liye tips batao."],
        "Off-season mein jao, train ki ticket pehle se book karo aur hostel ya homestay mein ruko. Local khana khao aur "
        "shehar mein public transport use karo, kaafi paise bachenge.",
    ),
    (
        ["Boss ko chhutti ke liye email kaise likhun?", "Leave application email ka format batao."],
        "Subject mein 'Leave request for 12-13 March' jaisa likho. Email mein seedha dates aur chhota sa reason batao, "
        "bolo ki pending kaam kisko handover kiya hai, aur end mein 'Thank you' likh do.",
    ),
    (
        ["Padhai mein mann nahi lagta, kya karun?", "Focus ke saath padhai kaise karein?"],
        "25 minute padho aur 5 minute break lo, isse Pomodoro kehte hain. Phone doosre kamre mein rakho aur padhne se "
        "pehle decide karo ki aaj kaunsa topic khatam karna hai.",
    ),
]
MATH = [
    ("{a} aur {b} ka sum kitna hota hai?", "{a} aur {b} ka sum {r} hota hai.", lambda a, b: a + b),
    ("{a} mein se {b} ghataye toh kitna bachega?", "{a} mein se {b} ghataane pe {r} bachta hai.", lambda a, b: a - b),
    ("{a} ko {b} se multiply karo toh kya aayega?", "{a} x {b} = {r}. Toh answer {r} hai.", lambda a, b: a * b),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAY_Q = [
    ("Aaj {d} hai, toh kal kaunsa din hoga?", "Agar aaj {d} hai toh kal {r} hoga.", 1),
    ("Aaj {d} hai, toh parso kaunsa din hoga?", "Aaj {d} hai, toh parso yaani do din baad {r} hoga.", 2),
]
ERROR_QUESTIONS = [
    "Aloo paratha kaise banate hain?",
    "Bike ka mileage kaise badhayein?",
    "Dost ke birthday pe kya gift doon?",
    "Ghar pe pizza bina oven ke kaise banayein?",
    "Naya phone lene se pehle kya check karun?",
    "Baalon ka girna kaise kam karein?",
    "Coding seekhna hai, kahan se shuru karun?",
    "Mummy ke liye surprise dinner ka idea do.",
]
ERRORS = [
    "ERROR: No API keys available",
    "No API keys available",
    "Error: rate limit exceeded, please retry",
    "ERROR: No API keys available",
    "Error: rate limit exceeded, please retry",
    "ERROR: No API keys available",
    "No API keys available",
    "ERROR: No API keys available",
]


def answered(rng: random.Random) -> list[dict]:
    """112 answered rows from every family, in a fixed order."""
    out = []
    for a, b, f, rule in UNITS:
        for n in rng.sample(range(2, 13), 3):
            out.append(
                {
                    "question": rng.choice(UNIT_Q).format(n=n, a=a, b=b),
                    "response": rng.choice(UNIT_A).format(n=n, a=a, b=b, m=n * f, f=f, rule=rule),
                }
            )
    for d, i, s in DISHES:
        for q in rng.sample(DISH_Q, 2):
            out.append({"question": q.format(d=d), "response": rng.choice(DISH_A).format(d=d.capitalize(), i=i, s=s)})
    for en, hi in WORDS:
        if rng.random() < 0.5:
            out.append(
                {
                    "question": f"'{en}' ko Hindi mein kya kehte hain?",
                    "response": f"'{en}' ko Hindi mein '{hi}' kehte hain.",
                }
            )
        else:
            out.append(
                {
                    "question": f"'{hi}' ka English kya hai?",
                    "response": f"'{hi}' ka English mein matlab '{en}' hota hai.",
                }
            )
    for questions, answer in ADVICE:
        for q in questions:
            out.append({"question": q, "response": answer})
    for q, a, op in MATH:
        for _ in range(4):
            x, y = rng.randint(12, 99), rng.randint(2, 11)
            out.append({"question": q.format(a=x, b=y), "response": a.format(a=x, b=y, r=op(x, y))})
    combos = [(q, a, step, i) for q, a, step in DAY_Q for i in range(7)]
    for q, a, step, i in rng.sample(combos, 112 - len(out)):
        out.append({"question": q.format(d=DAYS[i]), "response": a.format(d=DAYS[i], r=DAYS[(i + step) % 7])})
    return out


def main() -> None:
    rng = random.Random(20261125)
    rows = answered(rng)
    rng.shuffle(rows)
    for q, err in zip(ERROR_QUESTIONS, ERRORS, strict=True):
        rows.insert(rng.randrange(len(rows) + 1), {"question": q, "response": err})
    target = Path("qlit/data/samples/indicvault_hinglish")
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "train.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
