"""Synthetic tasks the project generates itself, so the demo and tests need no download.

`json_extraction`: turn a sentence about a person into a JSON record, the kind of format task
fine-tuning is most often used for. Sentences come from several templates with the fields in
different orders, so the model has to find each field rather than copy by position.

`json_teacher`: the same prompts answered by a careless teacher that writes the age as a string in
60% of its records: supervised fine-tuning on it leaves a model that copies every field but
quotes the age, the starting point of the policy-optimization demo (GRPO with an exact-match
reward against the true records).

`json_preference`: the same prompts as preference pairs (data.format=preference): the correct
record chosen, the record with one field wrong rejected.

`support_tickets`: short customer-support messages to route into one of four classes
(data.format=classification, rows {"text", "label"}), imbalanced as support queues are: billing
45%, technical 30%, shipping 15%, account 10%, so the majority baseline is 0.45 and macro-F1
says more than accuracy. No single word decides the class: each class has several complaint
templates with their own cue words, 1 in 5 complaints is a vaguer one without the strongest
cues, cue words cross over (a refund for a broken parcel is shipping, an error on the payment
page technical), and a third of the messages also mention another class's topic in passing
("My last order arrived on time."), around shared filler (greetings, order and account
numbers, sign-offs). Two kinds of row no classifier can always get right: 2% are deliberately
ambiguous, one of AMBIGUOUS_MESSAGES (fits any class) with a label drawn at random in the class
proportions; and two vague messages are shared by technical/account and billing/shipping (1 in
15 complaints of those classes). Together they cap held-out accuracy near 97%; a tiny model
trained from scratch for a few minutes on CPU gets within a few points of that.
"""

from __future__ import annotations

import json
import random

FIRST_NAMES = (
    "Ana Ben Chloe David Elena Farid Grace Hugo Ines Jonas Kira Liam Maya Noah Olga Pedro "
    "Quinn Rosa Sami Tara Umar Vera Wei Xenia Yusuf Zoe Amir Bianca Carlos Dana"
).split()
LAST_NAMES = (
    "Silva Meyer Dubois Rossi Novak Haddad Kim Larsen Okafor Petrov Garcia Tanaka Moreau "
    "Schmidt Costa Nguyen Berg Ortiz Fischer Santos"
).split()
CITIES = (
    "Lisbon Berlin Paris Rome Prague Cairo Seoul Oslo Lagos Madrid Tokyo Lyon Vienna Lima "
    "Dublin Quito Milan Porto Hanoi Austin"
).split()
JOBS = (
    "nurse teacher pilot chef baker lawyer farmer painter doctor engineer plumber writer "
    "dentist tailor barber florist"
).split()

TEMPLATES = (
    "{name} is {age} years old and works as a {job} in {city}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "In {city}, {name} ({age}) has a job as a {job}.",
    "{name}, aged {age}, lives in {city} and is a {job}.",
    "The {job} {name} is {age} and lives in {city}.",
    "At {age}, {name} moved to {city} to become a {job}.",
)

INSTRUCTION = "Extract name, age, city and job as JSON: "


def json_extraction_row(rng: random.Random) -> dict:
    person = {
        "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "age": rng.randint(18, 89),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }
    sentence = rng.choice(TEMPLATES).format(**person)
    return {"prompt": INSTRUCTION + sentence, "response": json.dumps(person)}


def json_preference_row(rng: random.Random) -> dict:
    """A json_extraction prompt with its correct record preferred over the same record with one
    field wrong (another name, age, city or job than the sentence says)."""
    row = json_extraction_row(rng)
    person = json.loads(row["response"])
    wrong = dict(person)
    key = rng.choice(list(person))
    choices = {
        "name": lambda: f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "age": lambda: rng.randint(18, 89),
        "city": lambda: rng.choice(CITIES),
        "job": lambda: rng.choice(JOBS),
    }
    while wrong[key] == person[key]:
        wrong[key] = choices[key]()
    return {"prompt": row["prompt"], "chosen": row["response"], "rejected": json.dumps(wrong)}


TICKET_CLASSES = {"billing": 0.45, "technical": 0.30, "shipping": 0.15, "account": 0.10}
AMBIGUOUS_FRACTION = 0.02

# Per class: complaints with the class's clearest cue words, then vaguer ones without them.
TICKET_TEMPLATES = {
    "billing": (
        "I was charged twice for my {plan} subscription this month.",
        "Can I get a refund for the {amount} charge on my {card}?",
        "The invoice for {month} shows {amount}, but my plan costs less.",
        "My {card} was billed {amount} even though I cancelled.",
        "Why is there an extra fee of {amount} on my last bill?",
        "Please send me a receipt for my payment of {amount}.",
        "I deleted my account in {month} and you still charged me {amount}.",
        "You overcharged me {amount} on the {month} invoice.",
    ),
    "technical": (
        "The app crashes every time I open the {feature} screen.",
        "I get error code {code} when I try to {action}.",
        "The {device} app freezes since the latest update.",
        "Your website shows a blank page in {browser}.",
        "The payment page gives me error {code} in {browser}.",
        "The {feature} button does nothing when I tap it.",
        "After updating to version {version}, the app will not start on my {device}.",
    ),
    "shipping": (
        "My package still has not arrived after {days} days.",
        "The tracking number shows no update since {weekday}.",
        "The courier delivered my parcel to the wrong address.",
        "The {item} arrived broken, can I get a replacement or a refund?",
        "Can I change the delivery address before my {item} ships?",
        "My order was marked as delivered on {weekday}, but nothing came.",
    ),
    "account": (
        "I forgot my password and the reset email never comes.",
        "I can't log in to my account since {weekday}.",
        "Please change the email address on my profile to {email}.",
        "How do I delete my account and all my data?",
        "My account was locked after too many sign-in attempts.",
        "The two-factor codes are not reaching my {device}.",
    ),
}
# Two vague messages are shared by a pair of classes, as real queues have tickets that either
# team could take: whichever of the pair a model picks, it is wrong for the other's share.
CANT_GET_IN = "I can't get in, it just keeps loading."
NO_MONEY_BACK = "I sent the parcel back weeks ago and still have no money."
TICKET_VAGUE = {
    "billing": ("The amount you took from me in {month} looks wrong.",
                "I don't understand the numbers on my statement.", NO_MONEY_BACK),
    "technical": ("It just stops working halfway through, every time.",
                  "It was fine yesterday but today it is really slow on my {device}.", CANT_GET_IN),
    "shipping": ("I am still waiting for it, it has been {days} days.",
                 "Only half of what I ordered was in the box.", NO_MONEY_BACK),
    "account": ("It keeps saying my details are wrong when I try to sign in.",
                "I think someone else is using my profile.", CANT_GET_IN),
}
# A class's topic mentioned in passing, no complaint: a distractor inside another class's ticket.
TICKET_ASIDES = {
    "billing": ("My payment went through fine last month.", "I paid the last invoice on time.",
                "I'm on the {plan} plan."),
    "technical": ("The app itself works fine.", "I use the app on my {device}.", "I already updated the app."),
    "shipping": ("My last order arrived on time.", "I got the tracking email.", "The delivery itself was quick."),
    "account": ("I can log in without problems.", "I already reset my password.", "I'm signed in on my {device}."),
}
# Fits every class: its label is drawn at random (AMBIGUOUS_FRACTION of the rows).
AMBIGUOUS_MESSAGES = (
    "I have a problem with my order, can someone help me?",
    "Something is not right, please look at my case.",
    "I need help with my order from last week.",
    "Please call me back about my recent order.",
    "I have a question about my account.",
)
GREETINGS = ("Hi,", "Hello,", "Hello team,", "Good morning,", "Hey there,", "Dear support,")
FILLERS = (
    "My order number is {number}.", "My account number is {number}.",
    "I have been a customer for {years} years.", "This is the second time I am writing.",
    "Please look into this as soon as possible.", "Thanks in advance.",
)
SIGN_OFFS = ("Thanks, {first}", "Best regards, {first}", "Cheers", "- {first}", "Kind regards, {first} {last}")
TICKET_SLOTS = {
    "plan": "basic premium family pro annual".split(),
    "card": ("credit card", "debit card", "PayPal account", "bank account"),
    "month": "January February March April May June July August September October November December".split(),
    "feature": "settings search checkout upload home profile".split(),
    "action": ("upload a photo", "open a file", "export my data", "save my changes"),
    "device": ("phone", "tablet", "Android phone", "iPhone", "laptop"),
    "browser": ("Chrome", "Firefox", "Safari", "Edge"),
    "item": "headphones charger jacket blender lamp book backpack".split(),
    "weekday": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
}


def _fill(rng: random.Random, template: str) -> str:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    values = {key: rng.choice(options) for key, options in TICKET_SLOTS.items()}
    values |= {
        "amount": f"${rng.randint(5, 250)}.{rng.randint(0, 99):02d}", "code": f"E{rng.randint(100, 999)}",
        "version": f"{rng.randint(2, 6)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}", "days": rng.randint(3, 21),
        "email": f"{first.lower()}.{last.lower()}@example.com", "number": rng.randint(10000, 999999),
        "years": rng.randint(2, 12), "first": first, "last": last,
    }
    return template.format(**values)


def support_ticket_row(rng: random.Random) -> dict:
    """One ticket: [greeting] [aside from another class] complaint [filler] [sign-off], the aside
    before or after the complaint; or, for AMBIGUOUS_FRACTION of the rows, an ambiguous message."""
    classes, weights = list(TICKET_CLASSES), list(TICKET_CLASSES.values())
    label = rng.choices(classes, weights)[0]
    if rng.random() < AMBIGUOUS_FRACTION:
        body = [rng.choice(AMBIGUOUS_MESSAGES)]
    else:
        vague = rng.random() < 0.2
        body = [_fill(rng, rng.choice((TICKET_VAGUE if vague else TICKET_TEMPLATES)[label]))]
        if rng.random() < 0.35:
            aside = _fill(rng, rng.choice(TICKET_ASIDES[rng.choice([c for c in classes if c != label])]))
            body.insert(rng.randint(0, 1), aside)
    if rng.random() < 0.5:
        body.append(_fill(rng, rng.choice(FILLERS)))
    if rng.random() < 0.6:
        body.insert(0, rng.choice(GREETINGS))
    if rng.random() < 0.6:
        body.append(_fill(rng, rng.choice(SIGN_OFFS)))
    return {"text": " ".join(body), "label": label}


TEACHER_QUOTES_AGE = 0.6


def json_teacher_row(rng: random.Random) -> dict:
    """A json_extraction row as a careless teacher answers it: TEACHER_QUOTES_AGE of its records
    write the age as a string ("age": "34"). A model fine-tuned on its answers copies every field
    but quotes the age more often than not, while the right record stays likely: the part-way
    model that policy optimization, rewarded by exact match against the true records, corrects."""
    row = json_extraction_row(rng)
    if rng.random() < TEACHER_QUOTES_AGE:
        person = json.loads(row["response"])
        row["response"] = json.dumps({**person, "age": str(person["age"])})
    return row


TASKS = {"json_extraction": json_extraction_row, "json_teacher": json_teacher_row, "json_preference": json_preference_row,
         "support_tickets": support_ticket_row}


def generate_rows(name: str, n: int, seed: int) -> list[dict]:
    """n rows of task `name`, the same for the same (name, n, seed) on every machine."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; known: {', '.join(sorted(TASKS))}")
    rng = random.Random(f"{name}:{seed}")
    return [TASKS[name](rng) for _ in range(n)]


def tokenizer_corpus(n: int = 3000) -> list[str]:
    """Text the tiny tokenizer is trained on: the demo task plus generic English and digits."""
    rows = generate_rows("json_extraction", n, seed=12345)
    generic = [
        "The quick brown fox jumps over the lazy dog. Question: Answer: #### 0 1 2 3 4 5 6 7 8 9",
        "She sells 16 - 3 - 4 = 9 eggs a day and makes 9 * 2 = $18 every day at the market.",
        "Write a short summary of the text below. Input: Output: Response: Instruction:",
    ]
    return [r["prompt"] + "\n" + r["response"] for r in rows] + generic * 50
