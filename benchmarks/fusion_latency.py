"""Fused replies against local ones, with a cloud that streams like a hosted one.

The local model is SmolLM2-135M (1 thread). The cloud is the same SmolLM2 behind
llama-cpp-python's server (1 thread; raw ChatML prompts), so the two agree on nearly every
token, as a strong cloud does on most of a reply; its streams are recorded once and then
replayed by tests/support/replay.py at a hosted cloud's pace (first token after the
round trip, then --rates tokens/s), behind the FaultProxy, which delays every byte by
RTT/2 each way (no tc/netem on this kernel). Every reply starts from a cold local cache;
greedy, the same questions for every cell. For each rate and round trip: local alone,
fused with batches of the cloud's tokens (fusion.batch_tokens = 16), and fused token by
token (batch_tokens = 0), in the same run. Then the same three against the live stand-in at
its own pace (--live-rtts): it decodes on the machine's other core, so it is no faster than
the local model, the case where batches must not cost anything.

    .venv/bin/python -m benchmarks.fusion_latency [--reps 5] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import (
    add_fusion_option,
    fresh_reply,
    fusion_overrides,
    make_session,
    median,
    p95,
)
from floe_app.engine.hardware import cpu_info
from floe_app.engine.local import bundled_model_path
from tests.support.cloud_server import CloudServer
from tests.support.proxy import FaultProxy
from tests.support.replay import ReplayCloud

QUESTIONS = ["Why is the sky blue?", "Give me a tip for sleeping better.",
             "How do plants make food?", "Write two sentences about cats.",
             "What does a bicycle have?", "Describe a sunny morning."]
SYSTEM = "You are a concise and helpful assistant."
MODEL = "smollm2-135m-instruct"
MODES = (("local", "local", 0), ("fused, batches", "fused", 16),
         ("fused, one by one", "fused", 0))


def run_cell(session, replay, mode: str, batch: int, reps: int) -> dict[str, float]:
    """`replay` None: the session's cloud is the live stand-in itself."""
    session.config.fusion.batch_tokens = batch
    if replay is not None:
        replay.reset_counts()
    ttft, rate, gaps, accepted, acceptance, requests, waited = [], [], [], [], [], [], []
    for rep in range(reps):
        done, _ = fresh_reply(session, QUESTIONS[rep % len(QUESTIONS)], mode, SYSTEM)
        stats = done.stats
        ttft.append(stats["ttft_ms"])
        rate.append(stats["tokens_per_s"])
        gaps.extend(session.last_run.stats.gaps_ms)
        cloud = stats.get("cloud", {})
        requests.append(cloud.get("requests", 0))
        waited.append(cloud.get("waited_ms", 0.0))
        batches = cloud.get("batches", {})
        accepted.append(batches.get("accepted", 0.0))
        acceptance.append(batches.get("acceptance", 0.0))
    return {"ttft": median(ttft), "rate": median(rate), "p95": p95(gaps),
            "accepted": median(accepted), "acceptance": median(acceptance),
            "requests": sum(requests) / len(requests), "waited": median(waited),
            # Requests the recording lacked (a re-ask from a prefix the recording pass did
            # not reach): the live stand-in answered them, at its own pace, on a shared core.
            "live": (replay.stats["forwarded"] if replay is not None else sum(requests)) / reps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rates", default="100,150")
    parser.add_argument("--rtts", default="50,150,400")
    parser.add_argument("--live-rtts", default="50",
                        help="round trips for cells with the live stand-in at its own pace"
                             " (on this machine's other core: slower than the local model)")
    add_fusion_option(parser)
    args = parser.parse_args()
    overrides = fusion_overrides(parser, args.fusion)
    folder = Path(tempfile.mkdtemp(prefix="floe-latency-"))
    server = CloudServer(bundled_model_path(), chat_format="chatml", alias=MODEL)
    replay = ReplayCloud(folder / "recording.jsonl", server.base_url, ttft_ms=0,
                         tokens_per_s=10_000)
    proxy = FaultProxy("127.0.0.1", replay.port)
    live = FaultProxy("127.0.0.1", server.port)
    rows = []
    try:
        session = make_session(proxy, args.max_tokens, model=MODEL,
                               cloud={"provider": "llama-cpp-python"}, **overrides)
        deadline = session.config.fusion.deadline_ms
        for rep in range(args.reps):  # record every request the cells will make
            for _, mode, batch in MODES[1:]:
                session.config.fusion.batch_tokens = batch
                fresh_reply(session, QUESTIONS[rep % len(QUESTIONS)], mode, SYSTEM)
        rates = [float(r) for r in args.rates.split(",")]
        for rate in rates:
            replay.configure(tokens_per_s=rate)
            for rtt in [int(r) for r in args.rtts.split(",")]:
                proxy.faults.delay_s = rtt / 2000
                for label, mode, batch in MODES:
                    cell = run_cell(session, replay, mode, batch, args.reps)
                    rows.append((rate, rtt, label, cell))
        live_session = make_session(live, args.max_tokens, model=MODEL,
                                    cloud={"provider": "llama-cpp-python"}, **overrides)
        for rtt in [int(r) for r in args.live_rtts.split(",") if r]:
            live.faults.delay_s = rtt / 2000
            for label, mode, batch in MODES:
                rows.append((0, rtt, label, run_cell(live_session, None, mode, batch, args.reps)))
    finally:
        live.close()
        proxy.close()
        replay.close()
        server.stop()
    print(f"Fusion latency: {cpu_info().model}, {cpu_info().logical_cores} cores; local"
          f" SmolLM2-135M (1 thread); cloud: SmolLM2 replayed at RATE tokens/s after the"
          f" round trip; greedy, up to {args.max_tokens} tokens, {args.reps} replies per"
          f" cell, medians; deadline {deadline} ms"
          + "".join(f"; {item}" for item in args.fusion))
    print(f"{'rate':>5} {'RTT':>4} {'mode':<18} {'TTFT ms':>8} {'tok/s':>7} {'p95 gap':>8}"
          f" {'from batches':>12} {'acceptance':>10} {'req/reply':>9} {'live/reply':>10}"
          f" {'waited ms':>9}")
    for rate, rtt, label, cell in rows:
        shown = f"{rate:.0f}" if rate else "live"
        print(f"{shown:>5} {rtt:>4} {label:<18} {cell['ttft']:>8.1f} {cell['rate']:>7.1f}"
              f" {cell['p95']:>8.1f} {cell['accepted']:>12.0%} {cell['acceptance']:>10.0%}"
              f" {cell['requests']:>9.1f} {cell['live']:>10.1f} {cell['waited']:>9.0f}")
    print()
    by = {(r[0], r[1], r[2]): r[3] for r in rows}
    for rate, rtt, label, _ in rows:
        if label != "local":
            continue
        local = by[(rate, rtt, "local")]
        batched = by[(rate, rtt, "fused, batches")]
        plain = by[(rate, rtt, "fused, one by one")]
        cloud = f"{rate:.0f} tok/s" if rate else "live stand-in"
        print(f"{cloud}, RTT {rtt} ms: fused/local tokens/s"
              f" {batched['rate'] / local['rate']:.2f}x (target >= 1.5x), one by one"
              f" {plain['rate'] / local['rate']:.2f}x; TTFT fused - local"
              f" {batched['ttft'] - local['ttft']:+.1f} ms (target <= +10);"
              f" p95 gap {batched['p95']:.0f} ms (target <= {deadline});"
              f" {batched['accepted']:.0%} of tokens from batches")


if __name__ == "__main__":
    main()
