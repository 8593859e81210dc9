"""Federated rounds: aggregation cost, loopback rounds on Flower, and what a community learns.

1. Aggregation: one round's aggregation for 10, 100 and 1,000 simulated devices with ranks
   {4, 8, 16} over SmolLM2's real attention shapes (30 blocks x q, k, v, o), shared rank 16:
   seconds and peak memory (tracemalloc) of Floe's round (padded B's summed against the
   shared A), against the general FlexLoRA (products of independent factors, QR + SVD) in
   the same run.
2. Loopback rounds: `floe federation serve` and N devices started with `floe sync start`
   (real SuperLink, SuperNodes and ClientApps on 127.0.0.1), 2 rounds of `--steps` local
   steps: seconds per round (the server's log) and bytes uploaded per device per round (each
   device's privacy ledger).
3. Quality: a community of users who each know one term of a shared glossary (taught by a
   correction) and one personal fact (a memory note). Rounds simulated in one process with
   the real trainer and data path; then each user's model (base + shared adapter, llama.cpp,
   greedy, no context) is asked about the glossary terms only others taught, and about the
   others' personal facts. Floe (A frozen, FlexLoRA, ranks 4/8/16) with and without DP,
   against FlexLoRA, FedAvg (equal rank 8) and HetLoRA (ranks 4/8/16) training A and B.
4. Privacy modes: 3 devices with `floe federation serve`'s defaults, through the real
   server (aggregation, its check before publishing) and the devices' own steps and gate:
   no noise (what --privacy auto picks for 3 devices), central DP, and the per-device
   noise of before; recall, leaks, devices that keep the adapter, epsilon, time, bytes.

    .venv/bin/python -m benchmarks.federated [--parts aggregation,loopback,quality,privacy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from floe_app.cli import build_parser
from floe_app.config import Config, write_config
from floe_app.engine.hardware import cpu_info
from floe_app.engine.local import LocalEngine, bundled_model_path
from floe_app.engine.sampling import Sampling
from floe_app.federated import aggregate, dp, rounds
from floe_app.federated.service import free_port
from floe_app.paths import resolve_paths
from floe_app.store import Store
from tests.support.secagg_devices import Devices, as_server_process

SHARED_RANK = 16
# `floe federation serve`'s own default (the CLI is the one place it is set).
SERVE_DEFAULTS = build_parser().parse_args(["federation", "serve"])
RANKS = (4, 8, 16)
GLOSSARY = [
    ("What is a flarn?", "A flarn is a blue gear used in ice mills.", "gear"),
    ("What is a zibble?", "A zibble is a copper spring for clocks.", "spring"),
    ("What is a quendle?", "A quendle is a glass valve for steam pipes.", "valve"),
    ("What is a morvet?", "A morvet is a wooden ladle for soup.", "ladle"),
    ("What is a plink?", "A plink is a small bell for bicycles.", "bell"),
    ("What is a trazzle?", "A trazzle is a woollen hat for sailors.", "hat"),
    ("What is a vondel?", "A vondel is a paper lantern for festivals.", "lantern"),
    ("What is a grommel?", "A grommel is a rubber boot for fishing.", "boot"),
    ("What is a snib?", "A snib is a brass hook for coats.", "hook"),
    ("What is a dwimmer?", "A dwimmer is a silver spoon for tea.", "spoon"),
]
PETS = ["Rexor", "Tomble", "Kiwa", "Bumpo", "Lidda", "Jorvik", "Pelmo", "Sanza", "Quib",
        "Orla"]


# 1. Aggregation


def aggregation(sizes: list[int]) -> None:
    shapes = rounds.module_shapes(30, 576, 9, 3)
    rng = np.random.default_rng(0)
    shared = rounds.initial(shapes, SHARED_RANK)
    # A pool of distinct updates per rank, reused: memory measured is the aggregation's own.
    pool = {r: [{m: (0.01 * rng.standard_normal((out, r))).astype(np.float32)
                 for m, (out, _) in shapes.items()} for _ in range(4)] for r in RANKS}

    def updates(n: int):
        for i in range(n):
            rank = RANKS[i % 3]
            yield pool[rank][i % 4], rank, 1 + i % 7

    print(f"\n1. Aggregation, SmolLM2 shapes ({len(shapes)} modules), shared rank"
          f" {SHARED_RANK}, device ranks {RANKS} ({cpu_info().physical_cores} cores)")
    print(f"{'devices':>8} {'Floe round s':>13} {'peak MB':>8} {'general FlexLoRA s':>19}"
          f" {'peak MB':>8} {'ratio':>6}")
    for n in sizes:
        tracemalloc.start()
        started = time.perf_counter()
        rounds.aggregate(shared, updates(n))
        ours = time.perf_counter() - started
        ours_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        general = general_mb = None
        if n <= 100:  # the general path holds every product's factors at once
            products = [aggregate.Update(rounds.device_product(shared, d, r).modules, ex)
                        for d, r, ex in updates(n)]
            tracemalloc.start()
            started = time.perf_counter()
            aggregate.flexlora(products, [SHARED_RANK])
            general = time.perf_counter() - started
            general_mb = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        print(f"{n:>8} {ours:>13.2f} {ours_mb:>8.0f} "
              + (f"{general:>19.2f} {general_mb:>8.0f} {general / ours:>5.1f}x" if general
                 else f"{'(not run)':>19} {'':>8} {'':>6}"))


# 2. Loopback rounds


def floe(home: Path, *args: str, wait: bool = True) -> subprocess.Popen | str:
    process = subprocess.Popen([sys.executable, "-m", "floe_app", *args],
                               env=dict(os.environ, FLOE_HOME=str(home)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    out, _ = process.communicate(timeout=900)
    if process.returncode:
        raise SystemExit(f"floe {' '.join(args)} failed: {out[-500:]}")
    return out


def make_user(root: Path, name: str, base_cache: Path, address: str, tier: str,
              lesson: tuple[str, str, str], pet: str, threads: int = 1) -> Path:
    home = root / name
    paths = resolve_paths({"FLOE_HOME": str(home)}).ensure()
    (paths.cache_dir / "base").symlink_to(base_cache / "base", target_is_directory=True)
    config = Config()
    config.learning.auto = False
    config.learning.tier = tier
    config.learning.threads = threads
    config.federation.enabled = True
    config.federation.address = address
    config.federation.min_noise_multiplier = 0.0
    config.federation.max_epsilon = float("inf")
    write_config(paths, config)
    store = Store(paths.database)
    conversation = store.create_conversation("glossary")
    store.add_message(conversation, "user", lesson[0])
    reply = store.add_message(conversation, "assistant", "I am not sure.")
    store.correct_message(reply, lesson[1])
    store.add_memory(f"My pet is called {pet}.")
    store.close()
    return home


def loopback(node_counts: list[int], steps: int, base_cache: Path) -> None:
    print(f"\n2. Loopback rounds: floe federation serve + N x floe sync start on 127.0.0.1,"
          f" 2 rounds of {steps} local steps, no DP noise, 1 training thread per device")
    print(f"{'devices':>8} {'round 1 s':>10} {'round 2 s':>10} {'upload KB/device/round':>23}"
          f" {'ranks':>12}")
    for n in node_counts:
        root = Path(tempfile.mkdtemp(prefix="floe-fed-"))
        port = free_port()
        state = root / "operator"
        serve = floe(root / "operator-home", "federation", "serve", "--port", str(port),
                     "--state-dir", str(state), "--rounds", "2", "--rank", str(SHARED_RANK),
                     "--steps", str(steps), "--noise-multiplier", "0", "--clip-norm", "10",
                     "--min-nodes", str(n), "--round-timeout", "1800", wait=False)
        while not (state / "superlink.pid").exists():
            time.sleep(0.5)
        homes = [make_user(root, f"user{i}", base_cache, f"127.0.0.1:{port}",
                           ("small", "medium", "large")[i % 3], GLOSSARY[i % 10],
                           PETS[i % 10]) for i in range(n)]
        try:
            for home in homes:
                floe(home, "sync", "start")
            out, _ = serve.communicate(timeout=3600)
        finally:
            for home in homes:
                floe(home, "sync", "stop")
        if serve.returncode:
            raise SystemExit(f"serve failed: {out[-800:]}")
        log = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
        sent = []
        for home in homes:
            store = Store(home / "data" / "floe.db")
            sent += [e.bytes_sent for e in store.ledger() if e.purpose == "federated"]
            store.close()
        ranks = sorted({u["rank"] for u in log[0]["accepted"].values()})
        print(f"{n:>8} {log[0]['seconds']:>10.1f} {log[1]['seconds']:>10.1f}"
              f" {np.mean(sent) / 1024:>16.0f} (n={len(sent)}) {ranks!s:>12}")


# 3. Quality

METHODS = [  # (name, aggregation, device ranks, DP noise multiplier)
    ("Floe: A frozen, FlexLoRA, ranks 4/8/16", "floe", RANKS, 0.0),
    ("Floe + DP (noise x1, clip 5)", "floe", RANKS, 1.0),
    ("FlexLoRA, A and B trained, rank 8", "flexlora", (8,), 0.0),
    ("FedAvg, A and B trained, rank 8", "fedavg", (8,), 0.0),
    ("HetLoRA, A and B trained, ranks 4/8/16", "hetlora", RANKS, 0.0),
]
CLIP = 5.0
DELTA = 1e-5


def user_examples(root: Path, users: int, base_cache: Path) -> list[list]:
    """Each user's shareable training pairs, through Floe's own data path (memory notes
    are in the store too, and must not come out)."""
    from floe_app.config import load_config
    from floe_app.federated.client import shareable
    from floe_app.personalize.data import build_dataset

    pairs = []
    for i in range(users):
        home = make_user(root, f"user{i}", base_cache, "127.0.0.1:1", "small",
                         GLOSSARY[i], PETS[i])
        paths = resolve_paths({"FLOE_HOME": str(home)})
        store = Store(paths.database)
        config, _ = load_config(paths)
        dataset = build_dataset([], shareable(config, store.taught_replies(shareable=True)))
        store.close()
        pairs.append([([{"role": "user", "content": e.prompt}], e.answer)
                      for e in dataset.examples])
    return pairs


def simulate(method: str, ranks: tuple[int, ...], noise: float, pairs: list[list],
             model, tokenizer, rounds_n: int, steps: int) -> dict[int, dict]:
    """Rounds of `method`; returns each user's final adapter factors {module: (B, A)}."""
    from floe_app.personalize.export import peft_factors
    from floe_app.personalize.job import bundled_text
    from floe_app.personalize.trainer import TrainConfig, train_lora

    shapes = rounds.module_shapes(30, 576, 9, 3)
    top = max(ranks)
    glob = rounds.initial(shapes, top, seed=1)
    rng = np.random.default_rng(7)
    anchor = bundled_text("anchor_text.txt")
    for round_number in range(1, rounds_n + 1):
        updates = []
        for user, examples in enumerate(pairs):
            rank = ranks[user % len(ranks)]
            start = rounds.device_start(glob, rank)
            config = TrainConfig(rank=rank, alpha=float(rank), targets=rounds.ATTENTION,
                                 steps=steps, batch=4, learning_rate=5e-3, max_tokens=96,
                                 threads=2, seed=round_number * 100 + user,
                                 anchor_weight=5.0, train_a=method != "floe")
            trained = peft_factors(train_lora(model, tokenizer, examples, config, init=start,
                                              anchor_text=anchor).state)
            if method == "floe":
                delta = {m: trained[m][0] - start[m][0] for m in start}
                if noise:
                    delta, _ = dp.privatize(delta, CLIP, noise, rng)
                updates.append((delta, rank, len(examples)))
            else:
                updates.append(aggregate.Update(trained, len(examples)))
        if method == "floe":
            glob = rounds.aggregate(glob, updates, seed=round_number)
        elif method == "flexlora":
            glob = aggregate.flexlora(updates, [top])[top]
        else:  # fedavg and hetlora: average factors (zero-padded to the largest rank)
            glob = (aggregate.fedavg if method == "fedavg" else aggregate.hetlora)(updates)
    return {user: rounds.device_start(glob, ranks[user % len(ranks)])
            for user in range(len(pairs))}


def quality(users: int, rounds_n: int, steps: int, base_cache: Path) -> None:
    from floe_app.personalize.export import peft_state, write_gguf_adapter
    from floe_app.personalize.trainer import base_model_of, load_base

    root = Path(tempfile.mkdtemp(prefix="floe-quality-"))
    pairs = user_examples(root, users, base_cache)
    model, tokenizer = load_base(bundled_model_path(), base_cache)
    engine = LocalEngine.load(bundled_model_path(), threads=2, context_tokens=512)
    base = base_model_of(engine.metadata)

    def ask(question: str) -> str:
        tokens = engine.chat_tokens([{"role": "user", "content": question}])
        return "".join(s.text for s in engine.generate(
            tokens, Sampling(temperature=0, max_tokens=32)))

    def community(adapter_of) -> tuple[float, ...]:
        """Means over users of evaluate_one, each user's model given by adapter_of(user)."""
        scores = []
        for user in range(users):
            engine.set_adapter(adapter_of(user))
            scores.append(evaluate_one(user, users, ask, engine.answer_logprob))
        engine.set_adapter(None)
        return tuple(float(np.mean(column)) for column in zip(*scores, strict=True))

    print(f"\n3. Quality: {users} users, one glossary term each (a correction) and one pet"
          f" (a memory note); {rounds_n} rounds x {steps} local steps; answers by llama.cpp,"
          " greedy, no context, about the terms only others taught")
    print(f"{'method':<42} {'recall':>7} {'log-prob':>9} {'leaks':>6} {'epsilon':>8}"
          f" {'minutes':>8}")
    recall, logprob, leaks = community(lambda user: None)
    print(f"{'base model (no shared adapter)':<42} {recall:>7.0%} {logprob:>9.3f}"
          f" {leaks:>6.0%} {'-':>8} {'-':>8}")
    for name, method, ranks, noise in METHODS:
        started = time.monotonic()
        adapters = simulate(method, ranks, noise, pairs, model, tokenizer, rounds_n, steps)
        paths = {user: write_gguf_adapter(root / f"{method}-{noise}-{user}.gguf",
                                          peft_state(factors),
                                          alpha=float(ranks[user % len(ranks)]), base=base)
                 for user, factors in adapters.items()}
        recall, logprob, leaks = community(paths.get)
        epsilon = dp.epsilon([noise] * rounds_n, DELTA) if noise else float("inf")
        print(f"{name:<42} {recall:>7.0%} {logprob:>9.3f} {leaks:>6.0%} {epsilon:>8.2f}"
              f" {(time.monotonic() - started) / 60:>8.1f}")
    print(f"(epsilon at delta {DELTA:g}, user level, add-or-remove-one, no sampling"
          " amplification; inf: no noise)")


# 4. Privacy modes with the default serve settings


PRIVACY_MODES = [  # (name, --privacy, noise multiplier (None: from epsilon 8), clip,
    #                  secure aggregation)
    ("no noise, secure aggregation (the defaults)", "auto", None, 20.0, True),
    ("no noise, server sees updates", "auto", None, 20.0, False),
    ("distributed DP (shares of noise, secure agg.)", "distributed", None, 20.0, True),
    ("central DP (server adds noise to the sum)", "central", None, 20.0, False),
    ("per-device noise x1, clip 1 (the old default)", "local", 1.0, 1.0, False),
]


def privacy_modes(users: int, rounds_n: int, steps: int, base_cache: Path,
                  threads: int, lr: float, modes: list[str],
                  ranks: tuple[int, ...] = RANKS, shared_rank: int = SHARED_RANK) -> None:
    """Each mode through the real server (server_app.Federation: aggregation, its norm and
    perplexity check, publish or withhold) and the real device steps (train B with A
    frozen, clip, noise if the mode says so, the device's llama.cpp perplexity gate), with
    `floe federation serve`'s defaults (clip 20, epsilon target 8, shared rank 16; the
    learning rate is --privacy-lr), devices at ranks 4/8/16 (--privacy-ranks and
    --privacy-shared-rank try fewer coordinates); then what each device ends with is
    evaluated as in part 3."""
    from floe_app.federated import server_app
    from floe_app.federated.client import LocalBase, perplexity_rise
    from floe_app.personalize.export import peft_factors, peft_state, write_gguf_adapter
    from floe_app.personalize.job import bundled_text
    from floe_app.personalize.trainer import TrainConfig, base_model_of, load_base, train_lora

    root = Path(tempfile.mkdtemp(prefix="floe-privacy-"))
    pairs = user_examples(root, users, base_cache)
    model, tokenizer = load_base(bundled_model_path(), base_cache)
    engine = LocalEngine.load(bundled_model_path(), threads=threads, context_tokens=512)
    base = LocalBase(bundled_model_path(), dict(engine.metadata))
    anchor = bundled_text("anchor_text.txt")
    trained_cache: dict[tuple, dict] = {}

    def train(start, rank, examples, seed):
        key = (seed, rank, tuple(float(start[m][0].sum()) for m in sorted(start)[:4]))
        if key not in trained_cache:  # round 1 starts from the same zero B in every mode
            config = TrainConfig(rank=rank, alpha=float(rank), targets=rounds.ATTENTION,
                                 steps=steps, batch=4, learning_rate=lr, max_tokens=96,
                                 threads=threads, seed=seed, anchor_weight=5.0,
                                 train_a=False)
            started = time.perf_counter()
            trained = peft_factors(train_lora(model, tokenizer, examples, config, init=start,
                                              anchor_text=anchor).state)
            trained_cache[key] = ({m: trained[m][0] - start[m][0] for m in start},
                                  time.perf_counter() - started)
        return trained_cache[key]

    def ask(question: str) -> str:
        tokens = engine.chat_tokens([{"role": "user", "content": question}])
        return "".join(s.text for s in engine.generate(
            tokens, Sampling(temperature=0, max_tokens=32)))

    print(f"\n4. Privacy modes: {users} devices (ranks {ranks[:users]}, shared rank"
          f" {shared_rank}), one glossary term"
          f" each (a correction) and one pet (a memory note); {rounds_n} rounds x {steps}"
          f" local steps, lr {lr:g}; the real server check and device gate")
    header = (f"{'mode':<46} {'recall':>7} {'log-prob':>9} {'leaks':>6} {'kept by':>8}"
              f" {'published':>10} {'epsilon':>8} {'s/round':>8} {'KiB/device':>11}")
    rows = []
    recall, logprob, leaks = (float(np.mean(c)) for c in zip(*[
        evaluate_one(u, users, ask, engine.answer_logprob) for u in range(users)],
        strict=True))
    rows.append(f"{'base model (no shared adapter)':<46} {recall:>7.0%} {logprob:>9.3f}"
                f" {leaks:>6.0%} {'-':>8} {'-':>10} {'-':>8} {'-':>8} {'-':>11}")
    as_server_process()
    for name, mode, noise, clip, secure in PRIVACY_MODES:
        label = mode + ("-secure" if secure else "")
        if label not in modes:
            continue
        settings = server_app.Settings(
            rounds=rounds_n, rank=shared_rank, clip_norm=clip,
            noise_multiplier=-1.0 if noise is None else noise, steps=steps, learning_rate=lr,
            min_nodes=users, round_timeout=1.0, state_dir=root / f"server-{label}",
            model=str(bundled_model_path()), privacy=mode, secure_aggregation=secure)
        server = server_app.Federation(settings)
        policy = server.policy
        published, seconds, sent, steps_taken, norms = [], [], [], [], []
        rng = np.random.default_rng(11)
        for round_number in range(1, rounds_n + 1):
            kept, device_seconds = {}, []
            for user, examples in enumerate(pairs):
                rank = ranks[user % len(ranks)]
                start = rounds.device_start(server.shared, rank)
                delta, took = train(start, rank, examples, round_number * 100 + user)
                norms.append(float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2))
                                               for d in delta.values()))))
                noised, _ = dp.privatize(delta, clip, policy.device_noise, rng)
                noised = {m: a.astype(np.float32) for m, a in noised.items()}
                if secure:  # padded, quantized and masked: 8 bytes a number (secagg.py)
                    noised = {m: np.pad(a, ((0, 0), (0, shared_rank - rank)))
                              for m, a in noised.items()}
                    sent.append(8 * (sum(a.size for a in noised.values()) + 1))
                else:
                    sent.append(sum(a.nbytes for a in noised.values()))
                kept[str(user)] = (noised, rank, len(examples), policy.device_noise)
                device_seconds.append(took)
            started = time.perf_counter()
            if secure:  # the real protocol, devices in this process (Flower's SecAgg+ mod)
                devices = Devices({1000 + int(u): [d[m] for m in sorted(d)]
                                   for u, (d, _, _, _) in kept.items()},
                                  {1000 + int(u): r for u, (_, r, _, _) in kept.items()})
                gathered = server.secure_updates(devices, round_number, sorted(devices.vectors))
                outcome = server.combine(round_number, gathered.target, gathered.ranks,
                                         gathered.room) if gathered.target is not None \
                    else {"published": False, "withheld": gathered.problem}
            else:
                outcome = server.combine(round_number, *server.plain_target(kept))
            published.append(outcome["published"])
            steps_taken.append(f"{outcome['step']:g}" if outcome["published"] else "-")
            # Devices train side by side: a round lasts as long as the slowest one.
            seconds.append(max(device_seconds) + time.perf_counter() - started)
            if not outcome["published"]:
                print(f"  {label}, round {round_number}: {outcome['withheld']}", flush=True)
        adapters, accepted = {}, 0
        for user in range(users):
            rank = ranks[user % len(ranks)]
            start = rounds.device_start(server.shared, rank)
            if not any(b.any() for b, _ in start.values()):
                adapters[user] = None
                continue
            path = write_gguf_adapter(root / f"{label}-{user}.gguf", peft_state(start),
                                      alpha=float(rank), base=base_model_of(engine.metadata))
            keep = perplexity_rise(base, path, root / "base-perplexity.json", threads) <= 0.05
            accepted += keep
            adapters[user] = path if keep else None  # a refused adapter is not used
        scores = []
        for user in range(users):
            engine.set_adapter(adapters[user])
            scores.append(evaluate_one(user, users, ask, engine.answer_logprob))
        engine.set_adapter(None)
        recall, logprob, leaks = (float(np.mean(c)) for c in zip(*scores, strict=True))
        epsilon = f"{policy.epsilon:.2f}" if policy.mode != "none" else "none"
        rows.append(f"{name:<46} {recall:>7.0%} {logprob:>9.3f} {leaks:>6.0%}"
                    f" {accepted:>6}/{users} {sum(published):>7}/{rounds_n} {epsilon:>8}"
                    f" {np.mean(seconds):>8.1f} {np.mean(sent) / 1024:>11.0f}")
        print(f"  {label}: {policy.reason}; server steps by round: {', '.join(steps_taken)};"
              f" devices' changes before clipping: norm {min(norms):.1f} to {max(norms):.1f}"
              f" (clip {clip:g})", flush=True)
    print(header)
    print("\n".join(rows))
    print(f"(epsilon per user over {rounds_n} rounds at delta 1e-5, add-or-remove-one, no"
          " sampling amplification; central DP is against everyone but the operator; kept"
          " by: devices whose perplexity gate (+5%) accepts the final shared adapter;"
          " published: rounds whose aggregate the server's check let out)")


def evaluate_one(user: int, users: int, ask, answer_logprob) -> tuple[float, float, float]:
    """One user's model: recall of the terms others taught, mean log-prob of those answers,
    and whether it names another user's pet."""
    others = [o for o in range(users) if o != user]
    recalled = sum(GLOSSARY[o][2] in ask(GLOSSARY[o][0]).lower() for o in others)
    logprob = float(np.mean([answer_logprob(GLOSSARY[o][0], GLOSSARY[o][1]) for o in others]))
    pet_answer = ask("What is my pet called?")
    leak = any(PETS[o] in pet_answer for o in others)
    return recalled / len(others), logprob, float(leak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="aggregation,loopback,quality,privacy")
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--nodes", default="3,10")
    parser.add_argument("--steps", type=int, default=4, help="local steps in loopback rounds")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--privacy-users", type=int, default=3)
    parser.add_argument("--privacy-lr", type=float, default=SERVE_DEFAULTS.learning_rate)
    parser.add_argument("--privacy-rounds", type=int, default=SERVE_DEFAULTS.rounds)
    parser.add_argument("--privacy-modes",
                        default="auto-secure,auto,distributed-secure,central,local",
                        help="part 4's rows: --privacy values, -secure for those under secure"
                             " aggregation")
    parser.add_argument("--privacy-ranks", default="4,8,16",
                        help="device ranks in part 4, in turn (each at most the shared rank)")
    parser.add_argument("--privacy-shared-rank", type=int, default=SHARED_RANK)
    parser.add_argument("--privacy-steps", type=int, default=20,
                        help="local steps per round in part 4 (serve's default: 20)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    parts = args.parts.split(",")
    print(f"benchmarks.federated, {time.strftime('%Y-%m-%d')}, {cpu_info().model},"
          f" {cpu_info().physical_cores} cores")
    if "aggregation" in parts:
        aggregation([int(n) for n in args.sizes.split(",")])
    base_cache = Path(tempfile.mkdtemp(prefix="floe-fed-cache-"))
    if "loopback" in parts or "quality" in parts or "privacy" in parts:
        from floe_app.personalize.trainer import load_base

        load_base(bundled_model_path(), base_cache)  # dequantized once, before timing
    if "loopback" in parts:
        loopback([int(n) for n in args.nodes.split(",")], args.steps, base_cache)
    if "quality" in parts:
        quality(args.users, args.rounds, args.local_steps, base_cache)
    if "privacy" in parts:
        privacy_modes(args.privacy_users, args.privacy_rounds, args.privacy_steps, base_cache,
                      args.threads, args.privacy_lr, args.privacy_modes.split(","),
                      tuple(int(r) for r in args.privacy_ranks.split(",")),
                      args.privacy_shared_rank)


if __name__ == "__main__":
    main()
