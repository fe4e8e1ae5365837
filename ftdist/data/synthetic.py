"""Synthetic tasks the project generates itself, so the demo and tests need no download.

`json_extraction`: turn a sentence about a person into a JSON record, the kind of format task
fine-tuning is most often used for. Sentences come from several templates with the fields in
different orders, so the model has to find each field rather than copy by position.

`json_preference`: the same prompts as preference pairs (data.format=preference): the correct
record chosen, the record with one field wrong rejected.
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


TASKS = {"json_extraction": json_extraction_row, "json_preference": json_preference_row}


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
