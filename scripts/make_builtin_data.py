"""Writes src/lmloss/train/data/chat.jsonl: the built-in SFT data set.

Multi-turn ChatML-style conversations ({"messages": [{"role", "content"}, ...]})
built from small fact tables, deterministic (seeded), so that a tiny model can
learn them on a laptop CPU in minutes and its answers can be checked by eye.

    python scripts/make_builtin_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "China": "Beijing",
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Egypt": "Cairo",
    "Spain": "Madrid",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Germany": "Berlin",
    "India": "New Delhi",
    "Brazil": "Brasilia",
    "Russia": "Moscow",
    "Mexico": "Mexico City",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Poland": "Warsaw",
    "Turkey": "Ankara",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Austria": "Vienna",
    "Sweden": "Stockholm",
    "Ireland": "Dublin",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Argentina": "Buenos Aires",
    "Australia": "Canberra",
    "Finland": "Helsinki",
    "Nepal": "Kathmandu",
}
CAPITAL_QUESTIONS = ["Where is the capital of {c}?", "What is the capital of {c}?", "Which city is the capital of {c}?"]
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
}
SOUNDS = {
    "a dog": "barks",
    "a cat": "meows",
    "a cow": "moos",
    "a duck": "quacks",
    "a lion": "roars",
    "a sheep": "bleats",
    "a horse": "neighs",
    "a bee": "buzzes",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "happy": "sad",
    "open": "closed",
    "early": "late",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SYSTEM = "You are a helpful assistant."


def capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return rng.choice(CAPITAL_QUESTIONS).format(c=country), f"The capital is {CAPITALS[country]}."


def color(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(sorted(COLORS))
    return f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {COLORS[thing]}."


def sound(rng: random.Random) -> tuple[str, str]:
    animal = rng.choice(sorted(SOUNDS))
    return f"What sound does {animal} make?", f"{animal[0].upper() + animal[1:]} {SOUNDS[animal]}."


def opposite(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}, written {NUMBERS[a + b]}."


TOPICS = [capital, capital, color, sound, opposite, addition]
FOLLOW_UPS = [("Thanks!", "You are welcome."), ("Thank you.", "Glad to help."), ("Great, bye!", "Goodbye!")]


def conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.7 else []
    for _ in range(rng.choice([1, 2, 2, 3])):
        question, answer = rng.choice(TOPICS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.4:
        question, answer = rng.choice(FOLLOW_UPS)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main(count: int = 400, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = [json.dumps(conversation(rng), ensure_ascii=False) for _ in range(count)]
    out = Path(__file__).resolve().parents[1] / "src" / "lmloss" / "train" / "data" / "chat.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {count} conversations to {out}")


if __name__ == "__main__":
    main()
