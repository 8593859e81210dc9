"""Local decoding: Floe against raw llama.cpp, the chat window against `floe ask`, and a busy
computer.

Three parts, each comparing paths in the same run (alternating, medians):

raw   Floe's whole local chat path (`ChatSession.reply`: storing the message, fitting the
      context, writing the reply while it streams) against raw llama-cpp-python
      `create_completion(stream=True)`: same model, prompt, greedy sampling (repetition
      control off, so both write the same text) and thread count; empty KV cache each run.
chat  The same greedy reply (default sampler, up to 300 tokens) through the Textual app
      driven headless by Pilot and through `floe ask --json` in its own process: tokens/s
      and time to first token as the status bar and `floe ask --json` report them. The app
      runs with its frame clock ("frames") and with every token sent to the view at once
      ("per token", how it streamed before).
busy  Local tokens/s and time to first token with nothing else running, with one and with
      all cores kept busy by plain Python busy loops at normal priority: Floe's automatic
      thread count against every fixed count.

    .venv/bin/python -m benchmarks.local_decode [--parts raw,chat,busy] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from floe_app.config import Config, write_config
from floe_app.engine.compute import on_compute_thread
from floe_app.engine.hardware import WINDOW_S, cpu_info, default_threads
from floe_app.engine.local import (
    GenerationStats,
    LocalEngine,
    bundled_model_path,
    patched_model_params,
)
from floe_app.engine.sampling import Sampling
from floe_app.paths import Paths
from floe_app.session import ChatSession, Delta, Finished
from floe_app.store import Store

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CHAT_TOKENS = 300
BUSY_TOKENS = 96


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# raw: Floe's chat path against raw llama-cpp-python


def run_raw(llm, prompt: str, max_tokens: int) -> tuple[float, float, int, str]:
    llm.reset()
    start = time.perf_counter()
    first = last = None
    tokens = 0
    parts = []
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0,
                                       stream=True):
        if chunk["choices"][0]["finish_reason"] is not None:
            continue  # the closing chunk carries no token
        now = time.perf_counter()
        first = first or now
        last = now
        tokens += 1
        parts.append(chunk["choices"][0]["text"])
    return ((first - start) * 1000, (tokens - 1) / (last - first), tokens, "".join(parts))


def run_floe(session: ChatSession, max_tokens: int) -> tuple[float, float, int, str]:
    session.engine().clear_cache()
    cid = session.new_conversation()
    start = time.perf_counter()
    first = None
    for event in session.reply(cid, PROMPT):
        if isinstance(event, Delta) and first is None:
            first = time.perf_counter()
        if isinstance(event, Finished):
            done = event
    return ((first - start) * 1000, done.stats["tokens_per_s"], done.stats["tokens"], done.text)


def part_raw(reps: int, max_tokens: int) -> None:
    from llama_cpp import Llama

    threads = default_threads()
    config = Config()
    config.model.threads = threads  # fixed, as raw llama-cpp-python uses
    config.chat.temperature = 0.0
    config.chat.max_tokens = max_tokens
    config.chat.repeat_penalty, config.chat.dry_multiplier, config.chat.min_p = 1.0, 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        session = ChatSession(Store(Path(tmp) / "bench.db"), config)
        engine = session.engine()
        prompt = engine.format_chat([{"role": "system", "content": config.chat.system_prompt},
                                     {"role": "user", "content": PROMPT}])
        with patched_model_params():
            raw = Llama(str(bundled_model_path()), n_ctx=config.model.context_tokens,
                        n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        results: dict[str, list[tuple[float, float, int, str]]] = {
            "raw": [], "floe": [], "thread": []}
        # Raw llama.cpp evaluates on Floe's llama.cpp thread too: a second thread that
        # evaluates would slow both (engine/compute.py).
        on_compute_thread(run_raw, raw, prompt, 8)  # warm both up once
        run_floe(session, 8)
        for _ in range(reps):
            results["raw"].append(on_compute_thread(run_raw, raw, prompt, max_tokens))
            results["floe"].append(run_floe(session, max_tokens))
            # The chat window replies from a worker thread: the same path from another one.
            with ThreadPoolExecutor(1) as pool:
                results["thread"].append(pool.submit(run_floe, session, max_tokens).result())

    def med(path: str, index: int) -> float:
        return median([r[index] for r in results[path]])

    same_text = results["raw"][0][3].strip() == results["floe"][0][3].strip()
    print(f"\n## raw: Floe's chat path against raw llama-cpp-python ({threads} threads,"
          f" greedy, no repetition control, up to {max_tokens} tokens, median of {reps})")
    print(f"{'path':<28}{'TTFT ms':>10}{'tokens/s':>10}{'tokens':>8}")
    for label, path in (("raw llama-cpp-python", "raw"), ("floe (ChatSession.reply)", "floe"),
                        ("floe, from a new thread", "thread")):
        print(f"{label:<28}{med(path, 0):>10.1f}{med(path, 1):>10.1f}{med(path, 2):>8.0f}")
    ttft_ratio = med("floe", 0) / med("raw", 0)
    speed_ratio = med("floe", 1) / med("raw", 1)
    print(f"{'ratio floe / raw':<28}{ttft_ratio:>9.2f}x{speed_ratio:>9.2f}x")
    print(f"targets: tokens/s >= 0.95x raw ({'met' if speed_ratio >= 0.95 else 'MISSED'}),"
          f" TTFT <= 1.10x raw ({'met' if ttft_ratio <= 1.10 else 'MISSED'});"
          f" same text: {'yes' if same_text else 'no'}")


# chat: the Textual app (Pilot) against `floe ask`


def chat_config() -> Config:
    config = Config()
    config.chat.temperature = 0.0
    config.chat.max_tokens = CHAT_TOKENS
    config.learning.auto = False
    return config


def run_ask(home: Path) -> dict:
    env = dict(os.environ, FLOE_HOME=str(home), FLOE_PLUGINS="")
    out = subprocess.run([sys.executable, "-m", "floe_app", "ask", "--mode", "local", "--json",
                          PROMPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["stats"]


async def run_app(paths: Paths, home: Path, reps: int, record) -> None:
    from floe_app.session import ChatSession
    from floe_app.tui.app import FloeApp
    from floe_app.tui.widgets.chat_pane import FRAME_S
    from floe_app.tui.widgets.prompt import PromptInput
    from floe_app.tui.widgets.status import StatusBar

    app = FloeApp(ChatSession.open(paths, chat_config()), export_dir=home)
    async with app.run_test(size=(110, 36)) as pilot:
        while app.query_one(StatusBar).model == "no model":
            await pilot.pause(0.05)

        async def reply(frame_s: float) -> dict:
            app.chat_pane.frame_s = frame_s
            app.session.engine().clear_cache()
            await app.action_new_chat()
            app.query_one(PromptInput).text = PROMPT
            await pilot.press("enter")
            while app.generating:
                # Not pilot.pause(): it queues a callback on every widget and forces a
                # screen update each time, work the app does not do for a user.
                await asyncio.sleep(0.05)
            return dict(app.query_one(StatusBar).last_stats)

        await reply(FRAME_S)  # warm up
        for _ in range(reps):
            record("floe ask", await asyncio.to_thread(run_ask, home))
            # Automatic threads look back WINDOW_S: the `floe ask` process just used every
            # core, which would give the next reply's prompt one thread.
            await asyncio.sleep(WINDOW_S + 0.5)
            record("chat window, frames", await reply(FRAME_S))
            record("chat window, per token", await reply(0))


def part_chat(reps: int) -> None:
    results: dict[str, list[dict]] = {}

    def record(name: str, stats: dict) -> None:
        results.setdefault(name, []).append(stats)

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["FLOE_HOME"] = str(home)
        os.environ["FLOE_PLUGINS"] = ""  # as for `floe ask`: the same prompt on both paths
        from floe_app.paths import resolve_paths

        paths = resolve_paths().ensure()
        write_config(paths, chat_config())
        run_ask(home)  # warm up the page cache
        asyncio.run(run_app(paths, home, reps, record))
    ask = results["floe ask"]
    print(f"\n## chat: the Textual app (Pilot, headless) against `floe ask`, greedy, up to"
          f" {CHAT_TOKENS} tokens, default sampler and threads, median of {reps}")
    print(f"{'path':<26}{'TTFT ms':>10}{'tokens/s':>10}{'tokens':>8}{'vs ask':>8}")
    for name, rows in results.items():
        speed = median([r["tokens_per_s"] for r in rows])
        ratio = speed / median([r["tokens_per_s"] for r in ask])
        print(f"{name:<26}{median([r['ttft_ms'] for r in rows]):>10.1f}{speed:>10.1f}"
              f"{median([r['tokens'] for r in rows]):>8.0f}{ratio:>7.2f}x")
    print("target: chat window >= 0.9x floe ask")


# busy: automatic threads against every fixed count


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def part_busy(reps: int) -> None:
    cores = cpu_info().logical_cores
    engine = LocalEngine.load(bundled_model_path())
    most = engine.max_threads
    tokens = engine.chat_tokens([{"role": "system", "content": Config().chat.system_prompt},
                                 {"role": "user", "content": PROMPT}])
    sampling = Sampling(temperature=0.0, max_tokens=BUSY_TOKENS)
    policies: list[int | str] = ["auto", *range(1, cores + 1)]

    def run(policy: int | str) -> GenerationStats:
        engine.auto_threads = policy == "auto"
        if policy != "auto":
            engine.set_threads(int(policy))
        engine.clear_cache()
        stats = GenerationStats()
        for _ in engine.generate(tokens, sampling, stats=stats):
            pass
        return stats

    run("auto")
    loads = {"idle": 0, "one core busy": 1, "all cores busy": cores}
    results: dict[tuple[str, int | str], list[GenerationStats]] = {}
    for load, n in loads.items():
        busy = busy_loops(n)
        try:
            time.sleep(1.5)  # let the monitor see them
            for _ in range(reps):
                for policy in policies:
                    results.setdefault((load, policy), []).append(run(policy))
        finally:
            for process in busy:
                process.kill()
                process.wait()
        time.sleep(1.0)
    print(f"\n## busy: automatic threads (up to {most}) against fixed counts, greedy"
          f" {BUSY_TOKENS} tokens from an empty cache, median of {reps}")
    print(f"{'load':<16}{'threads':<10}{'TTFT ms':>10}{'tokens/s':>10}{'vs best':>9}"
          f"  chosen")
    for load in loads:
        best = max(median([s.tokens_per_s for s in results[(load, p)]])
                   for p in policies if p != "auto")
        for policy in policies:
            rows = results[(load, policy)]
            speed = median([s.tokens_per_s for s in rows])
            chosen = sorted({t for s in rows for t in s.threads}) if policy == "auto" else ""
            print(f"{load:<16}{policy!s:<10}{median([s.ttft_ms for s in rows]):>10.1f}"
                  f"{speed:>10.1f}{speed / best:>8.2f}x  {chosen}")
    print("target: auto within 0.9x of the best fixed count under every load")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="raw,chat,busy")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128, help="for the raw part")
    args = parser.parse_args()
    parts = args.parts.split(",")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Local decode, {bundled_model_path().name}, {cpu_info().model},"
          f" {cpu_info().logical_cores} logical / {cpu_info().physical_cores} physical cores,"
          f" load average {load:.2f} at the start")
    if "raw" in parts:
        part_raw(args.reps, args.max_tokens)
    if "chat" in parts:
        part_chat(args.reps)
    if "busy" in parts:
        part_busy(args.reps)


if __name__ == "__main__":
    main()
