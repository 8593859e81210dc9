"""Does fusion answer better than either model alone, as fast as the local one?

A mixed set: personal questions whose answers only the local model has (memory notes the
user gave Floe, never sent to the cloud) and general-knowledge questions the local
SmolLM2-135M-Instruct often misses. The cloud is Qwen2.5-Coder-1.5B-Instruct behind
llama-cpp-python's server (one thread; the local model has the other), behind the replay
server of tests/support/replay.py, behind the FaultProxy. The replay server records each
cloud request once, at the server's own pace (a few tokens/s), into
/tmp/floe-bench-cache/fusion_quality.jsonl and then replays it at a hosted cloud's pace
(first token after --ttft-ms, then --rate tokens/s). A setup is run again while any of its
requests was not recorded yet (up to --passes times), so the reported pass is served from the
recording; its "fwd" column says how many requests still went to the real server.

Setups: the local model alone, the cloud alone (chat), and fused with each way of continuing
a partial reply: a raw completions prompt in ChatML, chat with assistant prefill (emulated by
the replay server over the same model: see tests/support/replay.py) and chat that cannot
continue (one request per reply, re-aligned), each at the default fusion settings and with no
deadline (5 s per token, 60 s per reply). Greedy, up to --max-tokens tokens; a reply is right
when it contains one of the accepted answers (case-insensitive).

    .venv/bin/python -m benchmarks.fusion_quality [--questions 8] [--setups local,cloud]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from benchmarks.common import (
    add_fusion_option,
    fresh_reply,
    fusion_overrides,
    make_session,
    replayed_cloud,
)
from floe_app.engine.hardware import cpu_info

SYSTEM = "You are a concise and helpful assistant."
MODEL = "qwen2.5-1.5b-instruct"

# Memory notes (session.remember): the local model sees them, the cloud never does.
NOTES = ["The user's dog is named Biscotti.", "The user lives in Lisbon.",
         "The user's sister is called Marta.", "The user's favourite colour is teal.",
         "The user works as a nurse.", "The user drives a red Volvo.",
         "The user is allergic to peanuts.", "The user's partner is called Jonas.",
         "The user's cat is named Pixel.", "The user plays the cello.",
         "The user's favourite food is ramen.", "The user's birthday is on 14 March."]
PERSONAL = [("What is my dog's name?", ["biscotti"]), ("Which city do I live in?", ["lisbon"]),
            ("What is my sister called?", ["marta"]),
            ("What is my favourite colour?", ["teal"]), ("What is my job?", ["nurse"]),
            ("What car do I drive?", ["volvo"]), ("What am I allergic to?", ["peanut"]),
            ("What is my partner's name?", ["jonas"]), ("What is my cat called?", ["pixel"]),
            ("Which instrument do I play?", ["cello"]),
            ("What is my favourite food?", ["ramen"]),
            ("When is my birthday?", ["14 march", "march 14"])]
GENERAL = [("What is the capital of Australia?", ["canberra"]),
           ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
           ("What is the chemical symbol for gold?", ["au"]),
           ("How many sides does a hexagon have?", ["six", "6"]),
           ("Who wrote Pride and Prejudice?", ["austen"]),
           ("What is the square root of 144?", ["12", "twelve"]),
           ("What is the capital of Canada?", ["ottawa"]),
           ("Which element has the atomic number 1?", ["hydrogen"]),
           ("Who composed the Moonlight Sonata?", ["beethoven"]),
           ("What is the smallest prime number?", ["2", "two"]),
           ("Which planet is closest to the Sun?", ["mercury"]),
           ("What is the freezing point of water in Fahrenheit?", ["32"]),
           ("What language is mainly spoken in Brazil?", ["portuguese"]),
           ("Who developed the theory of relativity?", ["einstein"]),
           ("What is the longest river in Africa?", ["nile"]),
           ("Who was the first person to walk on the Moon?", ["armstrong"]),
           ("What is 7 times 8?", ["56"]),
           ("What is the currency of Japan?", ["yen"]),
           ("What is the capital of South Korea?", ["seoul"]),
           ("Who wrote the novel 1984?", ["orwell"]),
           ("How many bones are in the adult human body?", ["206"]),
           ("Who discovered penicillin?", ["fleming"]),
           ("What is the capital of Turkey?", ["ankara"]),
           ("What is the boiling point of water in Fahrenheit?", ["212"]),
           ("Who invented the telephone?", ["bell"]),
           ("In what year did World War II end?", ["1945"]),
           ("What is the capital of Kenya?", ["nairobi"]),
           ("Who wrote The Odyssey?", ["homer"]),
           ("What is 15 plus 27?", ["42"]),
           ("Which metal is liquid at room temperature?", ["mercury"])]

RAW = {"provider": "llama-cpp-python", "endpoint": "completions",
       "continuation": "raw_prompt", "prompt_format": "chatml"}
PREFILL = {"provider": "llama.cpp", "endpoint": "chat", "continuation": "prefill"}
NO_CONTINUATION = {"provider": "openai", "endpoint": "chat", "continuation": "none"}
NO_DEADLINE = {"deadline_ms": 5000, "wait_budget_ms": 60000}


@dataclass
class Setup:
    label: str
    mode: str
    cloud: dict[str, object] = field(default_factory=dict)
    fusion: dict[str, object] = field(default_factory=dict)
    can_continue: bool = True


SETUPS = {
    "local": Setup("local", "local"),
    "cloud": Setup("cloud (chat)", "cloud", NO_CONTINUATION),
    "raw": Setup("fused raw prompt", "fused", RAW),
    "raw-nodeadline": Setup("fused raw prompt, no deadline", "fused", RAW, NO_DEADLINE),
    "prefill": Setup("fused chat prefill", "fused", PREFILL),
    "prefill-nodeadline": Setup("fused chat prefill, no deadline", "fused", PREFILL,
                                NO_DEADLINE),
    "none": Setup("fused chat, re-aligned", "fused", NO_CONTINUATION, can_continue=False),
    "none-nodeadline": Setup("fused chat, re-aligned, no deadline", "fused", NO_CONTINUATION,
                             NO_DEADLINE, can_continue=False),
}


@dataclass
class Result:
    right: dict[str, int] = field(default_factory=lambda: {"personal": 0, "general": 0})
    asked: dict[str, int] = field(default_factory=lambda: {"personal": 0, "general": 0})
    ttft_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    waited_ms: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    notices: set[str] = field(default_factory=set)
    forwarded: int = 0  # cloud requests in this pass that the recording did not have
    passes: int = 0
    seconds: float = 0.0

    def accuracy(self, kind: str | None = None) -> float:
        kinds = [kind] if kind else ["personal", "general"]
        asked = sum(self.asked[k] for k in kinds)
        return 100.0 * sum(self.right[k] for k in kinds) / asked if asked else float("nan")


def right(text: str, answers: list[str]) -> bool:
    words = text.lower()
    return any(answer in words for answer in answers)


def run_setup(setup: Setup, proxy, args, questions) -> Result:
    # The local setup names a preset too, so that warming the cloud up probes nothing.
    session = make_session(proxy, args.max_tokens, model=MODEL,
                           cloud=setup.cloud or NO_CONTINUATION,
                           **{**args.overrides, **setup.fusion})
    for note in NOTES:
        session.remember(note)
    result = Result()
    start = time.monotonic()
    for kind, question, answers in questions:
        done, notices = fresh_reply(session, question, setup.mode, system_prompt=SYSTEM)
        result.notices.update(notices)
        result.asked[kind] += 1
        if right(done.text, answers):
            result.right[kind] += 1
        else:
            result.misses.append(f"{kind}: {question} -> {done.text.strip()[:80]!r}")
        stats = done.stats
        result.ttft_ms.append(float(stats.get("ttft_ms", float("nan"))))
        result.tokens_per_s.append(float(stats.get("tokens_per_s", float("nan"))))
        cloud = stats.get("cloud") or {}
        if setup.mode == "fused":
            if "waited_ms" in cloud:
                result.waited_ms.append(float(cloud["waited_ms"]))
            result.requests.append(int(cloud.get("requests", 0)))
        elif setup.mode == "cloud":
            result.requests.append(int(cloud.get("requests", 1)))
        else:
            result.requests.append(0)
    result.seconds = time.monotonic() - start
    session.store.close()
    return result


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def pick(items: list, n: int | None) -> list:
    """The first n, spread over the list (every k-th) so a quick run still mixes kinds."""
    if not n or n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--ttft-ms", type=float, default=400.0,
                        help="replayed cloud: first token after this long")
    parser.add_argument("--rate", type=float, default=80.0,
                        help="replayed cloud: tokens per second after the first")
    parser.add_argument("--questions", type=int, default=0,
                        help="a quick subset: this many of each kind (0: all)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated, from: {', '.join(SETUPS)}")
    parser.add_argument("--passes", type=int, default=4,
                        help="runs of a setup at most, until every request is recorded")
    parser.add_argument("--no-record", action="store_true",
                        help="never ask the real server: requests not recorded fail (404)")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "floe-bench-cache")
    parser.add_argument("--misses", action="store_true", help="list every wrong reply")
    add_fusion_option(parser)
    args = parser.parse_args()
    # A terminated run still stops its servers (the context managers below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.overrides = fusion_overrides(parser, args.fusion)
    chosen = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; choose from {list(SETUPS)}")
    questions = ([("personal", q, a) for q, a in pick(PERSONAL, args.questions)]
                 + [("general", q, a) for q, a in pick(GENERAL, args.questions)])
    recording = args.cache / "fusion_quality.jsonl"
    args.cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, Result] = {}
    began = time.monotonic()
    with replayed_cloud(args.cache, recording, ttft_ms=args.ttft_ms, tokens_per_s=args.rate,
                        record=not args.no_record) as (_, replay, proxy):
        for name in chosen:
            setup = SETUPS[name]
            for attempt in range(1, args.passes + 1):
                before = replay.stats
                result = run_setup(setup, proxy, args, questions)
                after = replay.stats
                result.forwarded = after["forwarded"] - before["forwarded"]
                result.passes = attempt
                print(f"  pass {attempt}, {result.seconds:.0f} s,"
                      f" {after['requests'] - before['requests']} cloud requests,"
                      f" {result.forwarded} not recorded yet"
                      f" ({after['not_recorded'] - before['not_recorded']} refused): "
                      + row(setup.label, result), flush=True)
                if result.forwarded == 0 or setup.mode == "local":
                    break
            results[name] = result
        stats = replay.stats
    report(results, args, questions, stats, time.monotonic() - began)


def row(label: str, r: Result) -> str:
    pause = f"{med(r.waited_ms):.0f}" if r.waited_ms else "n/a"
    return (f"{label:<38}{r.accuracy('personal'):>8.0f}%{r.accuracy('general'):>8.0f}%"
            f"{r.accuracy():>6.0f}%{med(r.ttft_ms):>9.0f}{med(r.tokens_per_s):>7.1f}"
            f"{pause:>9}{mean(r.requests):>10.2f}{r.forwarded:>5}")


def report(results: dict[str, Result], args, questions, stats, seconds: float) -> None:
    n_personal = sum(1 for q in questions if q[0] == "personal")
    n_general = len(questions) - n_personal
    cpu = cpu_info()
    print()
    print(f"Fusion quality, {date.today()}: {cpu.model}, {cpu.logical_cores} cores;"
          f" local SmolLM2-135M-Instruct (1 thread); cloud {MODEL} (llama-cpp-python,"
          f" 1 thread) replayed at first token {args.ttft_ms:.0f} ms + {args.rate:g} tokens/s"
          f" behind FaultProxy; greedy, {args.max_tokens} tokens;"
          f" {n_personal} personal + {n_general} general questions; {seconds:.0f} s in all;"
          f" recording: {stats['recorded_entries']} requests")
    header = (f"{'setup':<38}{'personal':>9}{'general':>9}{'all':>7}{'TTFT ms':>9}"
              f"{'tok/s':>7}{'pause ms':>9}{'req/reply':>10}{'fwd':>5}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(row(SETUPS[name].label, r))
    print("(accuracy in %; TTFT, tok/s and pause: medians per reply; req/reply: mean billed"
          " cloud requests; fwd: requests not served from the recording in the reported pass)")
    for name, r in results.items():
        if r.notices:
            print(f"notices, {SETUPS[name].label}: " + " | ".join(sorted(r.notices))[:400])
        if args.misses:
            for miss in r.misses:
                print(f"  miss, {SETUPS[name].label}: {miss}")
    check_targets(results)


def check_targets(results: dict[str, Result]) -> None:
    local, cloud = results.get("local"), results.get("cloud")
    fused = {k: r for k, r in results.items() if SETUPS[k].mode == "fused"}
    if not fused:
        return
    print("\nTargets (issue 11):")

    def line(ok: bool | None, text: str) -> None:
        mark = "n/a " if ok is None else ("ok  " if ok else "MISS")
        print(f"  [{mark}] {text}")

    for name, r in fused.items():
        label = SETUPS[name].label
        if local and cloud:
            better = max(local.accuracy(), cloud.accuracy())
            if not NO_DEADLINE.items() <= SETUPS[name].fusion.items():
                # The accuracy target is for the default settings.
                line(r.accuracy() >= better + 5,
                     f"{label}: all {r.accuracy():.0f}% >= better single {better:.0f}% + 5")
        if local:
            line(r.accuracy("personal") >= local.accuracy("personal"),
                 f"{label}: personal {r.accuracy('personal'):.0f}%"
                 f" >= local {local.accuracy('personal'):.0f}%")
            line(med(r.ttft_ms) <= med(local.ttft_ms) + 10,
                 f"{label}: TTFT {med(r.ttft_ms):.0f} ms <= local"
                 f" {med(local.ttft_ms):.0f} ms + 10")
        if cloud:
            line(r.accuracy("general") >= 0.98 * cloud.accuracy("general"),
                 f"{label}: general {r.accuracy('general'):.0f}%"
                 f" >= 0.98 x cloud {cloud.accuracy('general'):.0f}%")
        if not SETUPS[name].can_continue:
            line(mean(r.requests) <= 2,
                 f"{label}: {mean(r.requests):.2f} cloud requests per reply <= 2")


if __name__ == "__main__":
    main()
