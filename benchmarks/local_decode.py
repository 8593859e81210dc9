"""Floe's local chat path against raw llama-cpp-python: time to first token and tokens/s.

Same model, prompt, greedy sampling and thread count, alternating in one process; each
run starts from an empty KV cache. Floe's figure includes everything `floe ask` does per
reply (storing the message, fitting the context, writing the reply while it streams).

    .venv/bin/python benchmarks/local_decode.py [--reps 7] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from llama_cpp import Llama

from floe_app.config import Config
from floe_app.engine.hardware import cpu_info, default_threads
from floe_app.engine.local import bundled_model_path, patched_model_params
from floe_app.session import ChatSession, Delta, Finished
from floe_app.store import Store

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def run_raw(llm: Llama, prompt: str, max_tokens: int) -> tuple[float, float, int, str]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    threads = default_threads()
    config = Config()
    config.chat.temperature = 0.0
    config.chat.max_tokens = args.max_tokens
    with tempfile.TemporaryDirectory() as tmp:
        session = ChatSession(Store(Path(tmp) / "bench.db"), config)
        engine = session.engine()
        prompt = engine.format_chat([{"role": "system", "content": config.chat.system_prompt},
                                     {"role": "user", "content": PROMPT}])
        with patched_model_params():
            raw = Llama(str(bundled_model_path()), n_ctx=config.model.context_tokens,
                        n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        results: dict[str, list[tuple[float, float, int, str]]] = {"raw": [], "floe": []}
        run_raw(raw, prompt, 8)  # warm both up once
        run_floe(session, 8)
        for _ in range(args.reps):
            results["raw"].append(run_raw(raw, prompt, args.max_tokens))
            results["floe"].append(run_floe(session, args.max_tokens))

    def median(path: str, index: int) -> float:
        return statistics.median(r[index] for r in results[path])

    same_text = results["raw"][0][3].strip() == results["floe"][0][3].strip()
    print(f"Local decode, {bundled_model_path().name}, {threads} threads, {cpu_info().model},"
          f" greedy, up to {args.max_tokens} tokens, median of {args.reps} runs")
    print(f"{'path':<28}{'TTFT ms':>10}{'tokens/s':>10}{'tokens':>8}")
    for label, path in (("raw llama-cpp-python", "raw"), ("floe (ChatSession.reply)", "floe")):
        print(f"{label:<28}{median(path, 0):>10.1f}{median(path, 1):>10.1f}"
              f"{median(path, 2):>8.0f}")
    ttft_ratio = median("floe", 0) / median("raw", 0)
    speed_ratio = median("floe", 1) / median("raw", 1)
    print(f"{'ratio floe / raw':<28}{ttft_ratio:>9.2f}x{speed_ratio:>9.2f}x")
    print(f"targets: tokens/s >= 0.95x raw ({'met' if speed_ratio >= 0.95 else 'MISSED'}),"
          f" TTFT <= 1.10x raw ({'met' if ttft_ratio <= 1.10 else 'MISSED'});"
          f" same text: {'yes' if same_text else 'no'}")


if __name__ == "__main__":
    main()
