"""Local, cloud and fused replies under emulated round-trip times: is Floe still real-time?

The cloud is llama-cpp-python's OpenAI-compatible server with gemma-3-270m (1 thread) on
127.0.0.1; the round trip is emulated by a TCP proxy that delays every byte by RTT/2 in
each direction (no tc/netem here). Every reply starts from cold prefix caches on both
sides. Greedy decoding, the same questions for every mode.

    .venv/bin/python -m benchmarks.fusion_latency [--reps 5] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import cloud_and_proxy, fresh_reply, make_session, median, p95
from floe_app.engine.hardware import cpu_info

QUESTIONS = ["What is the capital of France?", "Name three kinds of fruit.",
             "Why is the sky blue?", "Give me a tip for sleeping better.",
             "What does a bicycle have?", "How do plants make food?",
             "What is the largest ocean?", "Write one sentence about cats."]
RTTS_MS = (0, 50, 150, 400)
MODES = ("local", "cloud", "fused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    cache = Path(tempfile.gettempdir()) / "floe-bench-cache"
    rows = []
    fusion_ms: list[float] = []
    local_step_ms: list[float] = []
    with cloud_and_proxy(cache) as (_, proxy):
        session = make_session(proxy, args.max_tokens)
        deadline = session.config.fusion.deadline_ms
        fresh_reply(session, "Hello", "fused")  # load both models once
        for rtt in RTTS_MS:
            proxy.faults.delay_s = rtt / 2000
            for mode in MODES:
                ttft, rate, gaps, requests, restarts = [], [], [], [], []
                for rep in range(args.reps):
                    done, _ = fresh_reply(session, QUESTIONS[rep % len(QUESTIONS)], mode)
                    stats = done.stats
                    ttft.append(stats["ttft_ms"])
                    rate.append(stats["tokens_per_s"])
                    gaps.extend(session.last_run.stats.gaps_ms)
                    cloud = stats.get("cloud", {})
                    requests.append(cloud.get("requests", 0))
                    restarts.append(cloud.get("restarts", 0))
                    if mode == "fused":
                        fusion_ms.extend(session.last_run.fusion.fusion_ms)
                    if mode == "local":
                        local_step_ms.extend(session.last_run.stats.gaps_ms)
                over = sum(g > deadline for g in gaps) / max(1, len(gaps))
                rows.append((rtt, mode, median(ttft), median(rate), p95(gaps), over,
                             sum(requests) / len(requests), sum(restarts) / len(restarts)))

    print("Fusion latency: SmolLM2-135M local (1 thread) + gemma-3-270m"
          f" cloud (llama-cpp-python server, 1 thread), {cpu_info().model},"
          f" {cpu_info().logical_cores} cores; greedy, up to {args.max_tokens} tokens,"
          f" {args.reps} replies per cell, deadline {deadline} ms;"
          " RTT emulated by a delaying TCP proxy")
    print(f"{'RTT ms':>6} {'mode':<6} {'TTFT ms':>8} {'tok/s':>7} {'p95 gap':>8}"
          f" {'>deadline':>9} {'req/reply':>9} {'restarts':>8}")
    for rtt, mode, ttft, rate, gap, over, req, restarts in rows:
        print(f"{rtt:>6} {mode:<6} {ttft:>8.1f} {rate:>7.1f} {gap:>8.1f} {over:>9.1%}"
              f" {req:>9.1f} {restarts:>8.1f}")
    by = {(r[0], r[1]): r for r in rows}
    print()
    for rtt in RTTS_MS:
        local, cloud, fused = (by[(rtt, m)] for m in MODES)
        print(f"RTT {rtt:>3} ms: fused TTFT - local = {fused[2] - local[2]:+.1f} ms"
              f" (target <= +10);"
              f" fused vs cloud TTFT {1 - fused[2] / cloud[2]:.0%} lower"
              f"{' (target >= 60% at 150 ms)' if rtt == 150 else ''};"
              f" fused p95 gap {fused[4]:.0f} ms (target <= {deadline})")
    step = median(local_step_ms)
    math = median(fusion_ms)
    print(f"Fusion math per fused token: median {math:.3f} ms = {math / step:.1%} of a local"
          f" decode step ({step:.1f} ms) (target <= 5%)")


if __name__ == "__main__":
    main()
