"""Does fusion answer better than either model alone? Exact-match accuracy on a mixed set.

Personal questions have answers only in the local model's private context (facts the
user told Floe, never sent to the cloud); general questions test knowledge, where the
cloud model is meant to be stronger. Stand-ins: SmolLM2-135M-Instruct on the device,
gemma-3-270m (base) behind llama-cpp-python's OpenAI-compatible server as the cloud.
A reply counts as right when it contains the expected answer (case-insensitive).

    .venv/bin/python -m benchmarks.fusion_quality [--max-tokens 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import cloud_and_proxy, fresh_reply, make_session
from floe_app.engine.hardware import cpu_info

NOTES = ["The user's dog is named Biscotti.", "The user lives in Lisbon.",
         "The user's sister is called Marta.", "The user's favourite colour is teal.",
         "The user works as a nurse.", "The user drives a red Volvo."]
PERSONAL = [("What is my dog's name?", ["biscotti"]), ("Which city do I live in?", ["lisbon"]),
            ("What is my sister called?", ["marta"]),
            ("What is my favourite colour?", ["teal"]), ("What is my job?", ["nurse"]),
            ("What car do I drive?", ["volvo"])]
GENERAL = [("What is the capital of France?", ["paris"]),
           ("What is the capital of Japan?", ["tokyo"]),
           ("How many legs does a spider have?", ["eight", "8"]),
           ("What is the chemical symbol for gold?", ["au"]),
           ("Who wrote Romeo and Juliet?", ["shakespeare"]),
           ("Which planet is known as the Red Planet?", ["mars"]),
           ("What is the largest ocean on Earth?", ["pacific"]),
           ("At what temperature in Celsius does water boil?", ["100"]),
           ("What gas do plants take in from the air?", ["carbon dioxide", "co2"]),
           ("How many days are in a week?", ["seven", "7"])]
# (label, mode, fusion settings)
SETUPS = [("local", "local", {}), ("cloud", "cloud", {}),
          ("fused log-linear, 120 ms", "fused", {}),
          ("fused log-linear, 2 s", "fused", {"deadline_ms": 2000, "max_misses": 1000}),
          ("fused proxy-tuning, 2 s", "fused",
           {"form": "proxy", "deadline_ms": 2000, "max_misses": 1000})]


def right(text: str, answers: list[str]) -> bool:
    words = text.lower()
    return any(answer in words for answer in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()
    cache = Path(tempfile.gettempdir()) / "floe-bench-cache"
    results = {}
    with cloud_and_proxy(cache) as (_, proxy):
        for label, mode, fusion in SETUPS:
            session = make_session(proxy, args.max_tokens, **fusion)
            session.private_context = NOTES
            scores = {}
            for kind, questions in (("personal", PERSONAL), ("general", GENERAL)):
                scores[kind] = sum(right(fresh_reply(session, q, mode)[0].text, answers)
                                   for q, answers in questions)
            results[label] = scores
    print(f"Fusion quality: exact match, greedy, up to {args.max_tokens} tokens;"
          f" {len(PERSONAL)} personal + {len(GENERAL)} general questions;"
          f" {cpu_info().model}, {cpu_info().logical_cores} cores")
    print(f"{'setup':<28}{'personal':>10}{'general':>10}{'all':>10}")
    total = len(PERSONAL) + len(GENERAL)
    for label, scores in results.items():
        both = scores["personal"] + scores["general"]
        print(f"{label:<28}{scores['personal']:>7}/{len(PERSONAL):<2}"
              f"{scores['general']:>7}/{len(GENERAL):<2}{both:>7}/{total}")
    best_single = max(sum(results[k].values()) for k in ("local", "cloud"))
    best_fused = max(sum(v.values()) for k, v in results.items() if k.startswith("fused"))
    print(f"best fused {best_fused}/{total} vs better single model {best_single}/{total}"
          f" (target: fused >= the better of the two)")


if __name__ == "__main__":
    main()
