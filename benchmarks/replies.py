"""Replies that end: loops and length on everyday prompts, and short factual answers.

For each sampler configuration, every everyday prompt is answered with the chat's default
settings (system prompt, temperature, max_tokens) and a fixed seed per prompt; a reply
"loops" when one sentence (or line) occurs 3 or more times in it. The factual set is 30
short general-knowledge questions answered in at most 48 tokens, scored by whether the
expected word appears (sampled with the defaults at a fixed seed, and greedy).

"before" is Floe's sampler without any repetition control (no penalties, no min-p); "after"
is the current defaults. Configurations alternate prompt by prompt in one process.

    .venv/bin/python -m benchmarks.replies [--seeds 1] [--only before,after]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import time
from collections import Counter

from floe_app.config import ChatSettings
from floe_app.engine.hardware import cpu_info
from floe_app.engine.local import LocalEngine, bundled_model_path
from floe_app.engine.sampling import Sampling, sampling_from_settings

EVERYDAY = [
    "Give me three tips for sleeping better.",
    "Write a poem about autumn.",
    "How do I make a good cup of coffee?",
    "What should I pack for a weekend hiking trip?",
    "Explain what a budget is and how to make one.",
    "Write a short birthday message for my sister.",
    "How can I stay focused while working from home?",
    "Suggest a simple dinner recipe with chicken and rice.",
    "What are some good habits for learning a new language?",
    "Write a short story about a cat who wants to fly.",
    "How do I politely decline a meeting invitation?",
    "Give me ideas for a rainy day with kids.",
    "Explain how plants make their food.",
    "What are the benefits of regular exercise?",
    "Write an email asking my landlord to fix the heating.",
    "How do I start running if I have never run before?",
    "Describe a beautiful sunset at the beach.",
    "What can I do to reduce stress?",
    "Give me five ideas for a healthy breakfast.",
    "How do I take care of a houseplant?",
    "Write a thank-you note to a teacher.",
    "What is a good way to save money on groceries?",
    "Explain why the sky is blue in simple words.",
    "Tell me about the history of the bicycle.",
]

# (question, accepted answers): any of them appearing (case-insensitive) counts as right.
FACTUAL = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What is the chemical symbol for water?", ["h2o", "h₂o"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("What is the boiling point of water in Celsius?", ["100"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What is the largest ocean on Earth?", ["pacific"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "co2"]),
    ("What is the freezing point of water in Celsius?", ["0", "zero"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What is 12 times 12?", ["144"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What color do you get by mixing blue and yellow?", ["green"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is the tallest mountain in the world?", ["everest"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
    ("What is the primary language spoken in Brazil?", ["portuguese"]),
    ("How many hours are in a day?", ["24", "twenty-four"]),
    ("What is the square root of 81?", ["9", "nine"]),
    ("What is the currency of the United Kingdom?", ["pound"]),
    ("Which organ pumps blood through the body?", ["heart"]),
    ("What is the main ingredient in guacamole?", ["avocado"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("What star is at the center of our solar system?", ["sun"]),
]

FACT_TOKENS = 48


def sentences(text: str) -> list[str]:
    """Sentences and lines, normalized: lower case, list markers and punctuation dropped."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    out = []
    for part in parts:
        norm = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", part.lower())
        norm = re.sub(r"[^\w\s]", "", norm)
        norm = " ".join(norm.split())
        if len(norm.split()) >= 3:  # "Yes." or a bare heading is not a loop
            out.append(norm)
    return out


def loops(text: str) -> bool:
    counts = Counter(sentences(text))
    return bool(counts) and max(counts.values()) >= 3


def configurations() -> dict[str, Sampling]:
    after = sampling_from_settings(ChatSettings())
    return {"before": after.without_penalties(), "after": after}


def reply(engine: LocalEngine, system: str, prompt: str, sampling: Sampling) -> tuple[str, int]:
    tokens = engine.chat_tokens([{"role": "system", "content": system},
                                 {"role": "user", "content": prompt}])
    steps = list(engine.generate(tokens, sampling))
    return "".join(s.text for s in steps), sum(1 for s in steps if s.token >= 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="seeds per everyday prompt")
    parser.add_argument("--only", default="before,after")
    parser.add_argument("--show", action="store_true", help="print every reply")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=V,...",
                        help="another sampler: the defaults with these fields changed")
    parser.add_argument("--no-facts", action="store_true")
    args = parser.parse_args()

    engine = LocalEngine.load(bundled_model_path())
    chat = ChatSettings()
    configs = {k: v for k, v in configurations().items() if k in args.only.split(",")}
    for variant in args.variant:
        name, _, changes = variant.partition(":")
        fields = {f.name: f.type for f in dataclasses.fields(Sampling)}
        values = {key: (int if fields[key] in (int, "int") else float)(value)
                  for key, value in (c.split("=") for c in changes.split(",") if c)}
        configs[name] = dataclasses.replace(configurations()["after"], **values)
    started = time.perf_counter()
    results: dict[str, list[tuple[bool, int, str]]] = {name: [] for name in configs}
    for i, prompt in enumerate(EVERYDAY):
        for seed in range(args.seeds):
            for name, sampling in configs.items():
                text, n = reply(engine, chat.system_prompt, prompt,
                                dataclasses.replace(sampling, seed=1000 * seed + i))
                results[name].append((loops(text), n, text))
                if args.show:
                    print(f"--- {name} seed {seed}: {prompt} ({n} tokens, "
                          f"{'LOOP' if loops(text) else 'ok'})\n{text}\n")
    facts: dict[str, dict[str, int]] = {name: {"sampled": 0, "greedy": 0} for name in configs}
    for i, (question, answers) in enumerate([] if args.no_facts else FACTUAL):
        for name, sampling in configs.items():
            for kind, s in (("sampled", dataclasses.replace(sampling, seed=i)),
                            ("greedy", dataclasses.replace(sampling, temperature=0.0))):
                text, _ = reply(engine, chat.system_prompt, question,
                                dataclasses.replace(s, max_tokens=FACT_TOKENS))
                if any(a in text.lower() for a in answers):
                    facts[name][kind] += 1
    elapsed = time.perf_counter() - started

    cap = configs[next(iter(configs))].max_tokens
    print(f"Replies, {bundled_model_path().name}, {engine.threads} threads, {cpu_info().model};"
          f" {len(EVERYDAY)} everyday prompts x {args.seeds} seed(s), cap {cap} tokens;"
          f" {len(FACTUAL)} factual questions, {FACT_TOKENS} tokens; {elapsed:.0f} s")
    print(f"{'sampler':<10}{'loops':>10}{'at cap':>10}{'median':>8}{'max':>6}"
          f"{'facts sampled':>15}{'facts greedy':>14}")
    for name, rows in results.items():
        n = len(rows)
        looping = sum(r[0] for r in rows)
        capped = sum(r[1] >= cap for r in rows)
        lengths = [r[1] for r in rows]
        print(f"{name:<10}{f'{looping}/{n}':>10}{f'{capped}/{n}':>10}"
              f"{statistics.median(lengths):>8.0f}{max(lengths):>6}"
              f"{facts[name]['sampled']:>12}/{len(FACTUAL)}{facts[name]['greedy']:>11}/"
              f"{len(FACTUAL)}")
    print("settings:", {name: {k: v for k, v in dataclasses.asdict(s).items()
                               if k not in ("seed", "max_tokens")} for name, s in configs.items()})


if __name__ == "__main__":
    main()
