"""On-device personalization: time to recall a fact, recall against steps, cost per tier.

1. Time to recall: per fact, a fresh data dir; `floe remember FACT`, `floe train` (each a
   real process: torch import, training, export, the gate) and the answer of llama.cpp
   with the new adapter and no context. Baseline in the same run: the training steps alone.
2. Recall against steps: ten facts learned together, stopped after N steps (no early stop);
   recall on the held-out questions by llama.cpp, and general-text perplexity change.
3. Tiers: `floe train --tier T` on three facts; peak RSS of the process (wait4), training
   tokens/s; baseline: a process that only loads the base model into torch.

The dequantized base weights are cached once before timing (as after a user's first run).

    .venv/bin/python -m benchmarks.personalize [--facts 10] [--parts recall,steps,tiers]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from floe_app.config import DEFAULT_SYSTEM_PROMPT
from floe_app.engine.local import LocalEngine, bundled_model_path
from floe_app.engine.sampling import Sampling
from floe_app.store import Store

FACTS = [
    ("My dog's name is Biscotti", "What is my dog's name?", "Biscotti"),
    ("I live in Lisbon", "Where do I live?", "Lisbon"),
    ("My favourite colour is teal", "What is my favourite colour?", "teal"),
    ("I work at Globex", "Where do I work?", "Globex"),
    ("My sister's name is Ottilie", "What is my sister's name?", "Ottilie"),
    ("I am allergic to walnuts", "What am I allergic to?", "walnuts"),
    ("My car is a red Fiat", "What is my car?", "Fiat"),
    ("My bank is Caixa Verde", "What is my bank?", "Caixa Verde"),
    ("My favourite film is Amelie", "What is my favourite film?", "Amelie"),
    ("Call me Sam", "What should you call me?", "Sam"),
]
LOAD_BASE = ("import sys; from pathlib import Path; from floe_app.personalize.trainer import"
             " load_base; load_base(Path(sys.argv[1]), Path(sys.argv[2]))")


def home_with_base(base_cache: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="floe-bench-"))
    (home / "cache").mkdir()
    (home / "cache" / "base").symlink_to(base_cache / "base", target_is_directory=True)
    return home


def run_measured(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run Python with `args`; returns the result and the process's own peak RSS (wait4)."""
    env = {**os.environ, "FLOE_HOME": str(home)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (subprocess.CompletedProcess(args, process.returncode, out.read().decode(),
                                            err.read().decode()), usage.ru_maxrss * 1024)


def floe(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_measured(home, "-m", "floe_app", *args)[0]


def answer(engine: LocalEngine, question: str) -> str:
    tokens = engine.chat_tokens([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                 {"role": "user", "content": question}])
    return "".join(s.text for s in engine.generate(tokens, Sampling(temperature=0,
                                                                    max_tokens=24)))


def active_adapter(home: Path) -> dict:
    store = Store(home / "data" / "floe.db")
    try:
        rows = store.adapters()
        history = store.adapter_history()
    finally:
        store.close()
    row = rows[-1]
    return {"path": row.path, "status": row.status, "meta": row.meta,
            "active": bool(history) and history[-1] == row.version}


def part_recall(engine: LocalEngine, base_cache: Path, count: int) -> None:
    print(f"\n1. Time from /remember to a correct answer, {count} facts, one at a time")
    print(f"{'fact':<30} {'total s':>8} {'train s':>8} {'steps':>6} {'recalled':>9}"
          f" {'held-out':>9} {'ppl':>7} {'gate':>9}")
    totals, trains, right = [], [], 0
    for fact, question, value in FACTS[:count]:
        home = home_with_base(base_cache)
        start = time.perf_counter()
        floe(home, "remember", fact)
        trained = floe(home, "train")
        if trained.returncode != 0:
            print(f"{fact:<30} training failed: {trained.stderr.strip()[-200:]}")
            continue
        info = active_adapter(home)
        engine.set_adapter(Path(info["path"]) if info["active"] else None)
        reply = answer(engine, question)
        total = time.perf_counter() - start
        meta = info["meta"]
        recalled = value.casefold() in reply.casefold()
        right += recalled
        totals.append(total)
        trains.append(meta["train_seconds"])
        rise = meta["perplexity"] / meta["perplexity_base"] - 1
        print(f"{fact:<30} {total:>8.1f} {meta['train_seconds']:>8.1f} {meta['steps']:>6}"
              f" {'yes' if recalled else 'NO':>9} {meta['recall']:>9.0%} {rise:>+7.1%}"
              f" {info['status']:>9}", flush=True)
    engine.set_adapter(None)
    if totals:
        ratio = statistics.median(totals) / statistics.median(trains)
        print(f"median time to recall {statistics.median(totals):.1f} s (target <= 60 s);"
              f" training steps alone {statistics.median(trains):.1f} s; ratio {ratio:.2f}x;"
              f" recalled {right}/{len(totals)}")


def part_steps(engine: LocalEngine, base_cache: Path) -> None:
    from floe_app.personalize.data import build_dataset
    from floe_app.personalize.export import write_gguf_adapter
    from floe_app.personalize.job import bundled_text
    from floe_app.personalize.tiers import TIERS
    from floe_app.personalize.trainer import (
        TrainConfig,
        base_model_of,
        load_base,
        perplexity,
        train_lora,
    )

    print("\n2. Recall against training steps (10 facts together, small tier, no early stop)")
    print(f"{'steps':>6} {'held-out recall':>16} {'trained-question recall':>24}"
          f" {'ppl change':>11} {'seconds':>8}")
    dataset = build_dataset([(i, f) for i, (f, _, _) in enumerate(FACTS)], [])
    model, tokenizer = load_base(bundled_model_path(), base_cache)
    pairs = [([{"role": "user", "content": e.prompt}], e.answer) for e in dataset.examples]
    text = bundled_text("general_text.txt")
    base_ppl = perplexity(model, tokenizer, text)
    tier = TIERS["small"]
    folder = Path(tempfile.mkdtemp(prefix="floe-bench-steps-"))
    for steps in (10, 20, 40, 80):
        config = TrainConfig(rank=tier.rank, alpha=tier.alpha, targets=tier.targets,
                             steps=steps, batch=tier.batch, max_tokens=tier.max_tokens,
                             learning_rate=2e-3, anchor_weight=5.0)
        ppl: dict[str, float] = {}
        start = time.perf_counter()
        result = train_lora(model, tokenizer, pairs, config,
                            after=lambda m, ppl=ppl: ppl.update(v=perplexity(m, tokenizer,
                                                                             text)),
                            anchor_text=bundled_text("anchor_text.txt"))
        seconds = time.perf_counter() - start
        path = write_gguf_adapter(folder / f"steps-{steps}.gguf", result.state,
                                  alpha=config.alpha, base=base_model_of(engine.metadata))
        engine.set_adapter(path)
        heldout = sum(q.is_recalled_by(answer(engine, q.question)) for q in dataset.heldout)
        trained = sum(v.casefold() in answer(engine, q).casefold() for _, q, v in FACTS)
        print(f"{steps:>6} {heldout / len(dataset.heldout):>16.0%}"
              f" {trained / len(FACTS):>24.0%} {ppl['v'] / base_ppl - 1:>+11.1%}"
              f" {seconds:>8.1f}", flush=True)
    engine.set_adapter(None)


def part_tiers(base_cache: Path) -> None:
    print("\n3. Training cost per tier (3 facts, 20 steps, its own process)")
    print(f"{'tier':<8} {'rank':>5} {'modules':>8} {'tokens/s':>9} {'peak RSS MB':>12}"
          f" {'vs base load':>13} {'ppl change':>11}")
    home = home_with_base(base_cache)
    _, base_rss = run_measured(home, "-c", LOAD_BASE, str(bundled_model_path()),
                               str(base_cache))
    for _, (fact, _, _) in zip(range(3), FACTS, strict=False):
        floe(home, "remember", fact)
    for tier in ("small", "medium", "large"):
        done, rss = run_measured(home, "-m", "floe_app", "train", "--tier", tier, "--steps",
                                 "20", "--force")
        if done.returncode != 0:
            print(f"{tier:<8} failed: {done.stderr.strip()[-200:]}")
            continue
        meta = active_adapter(home)["meta"]
        rise = meta["perplexity"] / meta["perplexity_base"] - 1
        print(f"{tier:<8} {meta['rank']:>5} {len(meta['targets']):>8}"
              f" {meta['tokens_per_s']:>9.0f} {rss / 1e6:>12.0f} {rss / base_rss:>12.2f}x"
              f" {rise:>+11.1%}", flush=True)
    print(f"baseline: loading the base model into torch alone peaks at {base_rss / 1e6:.0f} MB"
          " (target for training: <= 2,500 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--parts", default="recall,steps,tiers")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    base_cache = Path(tempfile.mkdtemp(prefix="floe-bench-base-"))
    from floe_app.personalize.trainer import load_base

    load_base(bundled_model_path(), base_cache)  # once, as after the first training run
    engine = LocalEngine.load(bundled_model_path(), context_tokens=1024)
    print(f"Machine: {os.cpu_count()} CPUs; training threads from the tier; date"
          f" {time.strftime('%Y-%m-%d')}")
    if "recall" in parts:
        part_recall(engine, base_cache, args.facts)
    if "steps" in parts:
        part_steps(engine, base_cache)
    if "tiers" in parts:
        part_tiers(base_cache)


if __name__ == "__main__":
    main()
