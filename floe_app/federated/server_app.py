"""Floe's Flower ServerApp: rounds of FlexLoRA over devices of different ranks.

Each round every connected node gets the shared adapter and the round's settings; it
answers with a clipped (and, under DP, noised) change to the first `rank` columns of B, or
declines. Under secure aggregation (the default) the server learns only the round's average
(secagg.py). Otherwise it sees every update, and refuses those with wrong keys, shapes or
values, or a norm far outside the round's; the round completes with the rest. Either way the
aggregate is checked before it is published. The shared adapter and a JSON line per round
are written to the state folder after every round, so a run started again after a SuperLink
restart carries on from the last completed round. The shared adapter moves towards the
round's average only as far as every device's general-text check accepts. After the last
round every node gets the final adapter to keep.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from floe_app.engine.local import resolve_model_path
from floe_app.federated import privacy, rounds, secagg, validate
from floe_app.federated.client import LocalBase, perplexity_rise
from floe_app.paths import private_umask

app = ServerApp()

# How far the shared adapter moves towards a round's average, tried in turn until every
# device rank's general-text perplexity stays within the devices' margin (2026-11-26, 3
# devices at ranks 4/8/16: the full average raised it past 5% at ranks 8 and 16, so two of
# three devices refused it while the server published it).
SERVER_STEPS = (1.0, 0.5, 0.25, 0.125)


@dataclass
class Gathered:
    """A round's updates, combined: B' against the shared A (None: nothing to publish)."""

    target: dict[str, np.ndarray] | None
    ranks: list[int]  # device ranks in it (the perplexity check runs at each)
    room: float  # how far the updates could move the weights without noise (check())
    log: dict[str, Any]  # the round log's fields about who took part
    problem: str | None = None  # why there is no target, beyond "no updates"


@dataclass(frozen=True)
class Settings:
    """The run config ([tool.flwr.app.config] of the bundle, overridden by floe federation
    serve)."""

    rounds: int  # total rounds of the shared adapter, counting those done before a restart
    rank: int
    clip_norm: float
    noise_multiplier: float  # below 0: the least that keeps `epsilon` over `rounds` rounds
    steps: int
    learning_rate: float
    min_nodes: int  # also the devices per round DP expects (and divides by, central DP)
    round_timeout: float
    state_dir: Path
    model: str
    privacy: str = "auto"  # privacy.MODES
    epsilon: float = 8.0  # the DP target per user over the run, at delta
    delta: float = 1e-5
    perplexity_margin: float = 0.05  # the devices' default: a rise past it, none keeps it
    secure_aggregation: bool = True  # secagg.py: the server sees only each round's sum

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> Settings:
        return cls(int(config["rounds"]), int(config["rank"]), float(config["clip-norm"]),
                   float(config["noise-multiplier"]), int(config["steps"]),
                   float(config["learning-rate"]), int(config["min-nodes"]),
                   float(config["round-timeout"]), Path(str(config["state-dir"])),
                   str(config.get("model", "")), str(config.get("privacy", "auto")),
                   float(config.get("epsilon", 8.0)), float(config.get("delta", 1e-5)),
                   float(config.get("perplexity-margin", 0.05)),
                   str(config.get("secure-aggregation", True)).lower() in ("true", "1"))


@app.main()
def main(grid: Grid, context: Context) -> None:
    Federation(Settings.from_run_config(dict(context.run_config))).run(grid)


class Federation:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        private_umask()  # the round log and shared adapters: the operator's account only
        self.base = LocalBase.read(resolve_model_path(settings.model or None))
        self.shapes = rounds.model_shapes(self.base.metadata)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.done, self.shared = self._load()
        self.policy = privacy.choose(
            settings.privacy, expected_nodes=settings.min_nodes, rounds=settings.rounds,
            coordinates=sum(out * settings.rank for out, _ in self.shapes.values()),
            clip_norm=settings.clip_norm, target_epsilon=settings.epsilon,
            delta=settings.delta,
            noise_multiplier=settings.noise_multiplier if settings.noise_multiplier >= 0
            else None, secure_aggregation=settings.secure_aggregation)

    # State that survives a SuperLink (and ServerApp) restart

    def _load(self) -> tuple[int, rounds.Shared]:
        state = self.settings.state_dir / "state.json"
        if state.exists():
            saved = json.loads(state.read_text())
            if saved["base_model"] == self.base.identity and saved["rank"] == self.settings.rank:
                with np.load(self.settings.state_dir / saved["file"]) as arrays:
                    return saved["round"], {m: (arrays[f"{m}.B"], arrays[f"{m}.A"])
                                            for m in self.shapes}
        return 0, rounds.initial(self.shapes, self.settings.rank)

    def _save(self, round_number: int) -> str:
        name = f"shared-round-{round_number}.npz"
        tmp = self.settings.state_dir / (name + ".partial.npz")
        np.savez(tmp, **{f"{m}.{f}": x for m, (b, a) in self.shared.items()
                         for f, x in (("B", b), ("A", a))})
        tmp.replace(self.settings.state_dir / name)
        state = self.settings.state_dir / "state.json"
        state.with_suffix(".partial").write_text(json.dumps({
            "round": round_number, "file": name, "rank": self.settings.rank,
            "base_model": self.base.identity}))
        state.with_suffix(".partial").replace(state)
        return name

    def _log(self, entry: dict[str, Any]) -> None:
        with open(self.settings.state_dir / "rounds.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    # Rounds

    def _payload(self, round_number: int) -> RecordDict:
        s = self.settings
        return RecordDict({
            "shared": ArrayRecord({f"{m}.{f}": Array(np.ascontiguousarray(x))
                                   for m, (b, a) in self.shared.items()
                                   for f, x in (("B", b), ("A", a))}),
            "config": ConfigRecord({
                "round": round_number, "rank": s.rank, "clip-norm": s.clip_norm,
                "noise-multiplier": s.noise_multiplier, "steps": s.steps,
                "learning-rate": s.learning_rate, "base-model": self.base.identity,
                **self.policy.record()}),
        })

    def _nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.settings.round_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.settings.min_nodes or time.monotonic() > deadline:
                return nodes
            time.sleep(1.0)

    def run(self, grid: Grid) -> None:
        self._log({"event": "privacy", **self.policy.to_json(),
                   "statement": privacy.statement(self.policy)})
        for round_number in range(self.done + 1, self.settings.rounds + 1):
            self.round(grid, round_number)
        nodes = self._nodes(grid)
        payload = self._payload(self.settings.rounds)  # one for all (content-addressed)
        replies = grid.send_and_receive(
            [Message(payload, node, "evaluate") for node in nodes],
            timeout=self.settings.round_timeout)
        self._log({"event": "final", "round": self.settings.rounds, "nodes": len(nodes),
                   "installed": sum(1 for r in replies if not r.has_error()),
                   "refused": [r.error.reason for r in replies if r.has_error()]})

    def round(self, grid: Grid, round_number: int) -> None:
        started = time.monotonic()
        nodes = self._nodes(grid)
        if self.policy.mode == "central" and len(nodes) > self.policy.expected_nodes:
            # Central DP divides by the expected count: exactly that many are asked.
            picked = np.random.default_rng(secrets.randbits(64)).choice(
                len(nodes), self.policy.expected_nodes, replace=False)
            nodes = sorted(nodes[i] for i in picked)
        gather = self.secure_updates if self.policy.secure_aggregation else self.plain_updates
        try:
            gathered = gather(grid, round_number, nodes)
        except Exception as exc:  # the SuperLink failed mid-round (seen: its SQLite locked)
            # The shared adapter stays as it was; the next round starts afresh (late replies
            # to this one are for messages nobody waits on any more).
            self._log({"event": "round", "round": round_number, "nodes": len(nodes),
                       "error": f"{type(exc).__name__}: {exc}"[:300],
                       "seconds": round(time.monotonic() - started, 1)})
            return
        if gathered.target is not None:
            outcome = self.combine(round_number, gathered.target, gathered.ranks,
                                   gathered.room)
        else:
            outcome = {"published": False, "withheld": gathered.problem or "no updates"}
        version = self._save(round_number)
        self._log({"event": "round", "round": round_number, "nodes": len(nodes),
                   "seconds": round(time.monotonic() - started, 1),
                   "privacy": self.policy.mode,
                   "secure_aggregation": self.policy.secure_aggregation,
                   **gathered.log, **outcome,
                   "version": version, "settings": {k: str(v) if isinstance(v, Path) else v
                                                    for k, v in asdict(self.settings).items()}})

    def send(self, grid: Grid) -> secagg.Send:
        return lambda messages: grid.send_and_receive(messages,
                                                      timeout=self.settings.round_timeout)

    def plain_updates(self, grid: Grid, round_number: int, nodes: list[int]) -> Gathered:
        """Every device's update in the clear: each one checked, the bad ones refused."""
        payload = self._payload(round_number)
        messages = [Message(payload, node, "train", group_id=str(round_number))
                    for node in nodes]
        replies = secagg.by_node(messages, self.send(grid)(messages))
        accepted, norms, declined, refused = {}, {}, {}, {}
        for node_id, reply in replies:
            node = str(node_id)
            if reply.has_error():
                declined[node] = reply.error.reason
                continue
            update, problem = self.unpack(reply)
            if problem is not None:
                refused[node] = problem
                continue
            accepted[node] = update
            norms[node] = float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2))
                                            for d in update[0].values())))
        bound = {n: validate.noised_norm_bound(self.settings.clip_norm, u[3],
                                               sum(d.size for d in u[0].values()))
                 for n, u in accepted.items()}
        for node, reason in validate.norm_outliers(norms).items():
            refused[node] = reason
        for node in accepted:
            if norms[node] > bound[node]:
                refused[node] = (f"update norm {norms[node]:.3g} is above what clipping and"
                                 f" noise allow ({bound[node]:.3g})")
        kept = {n: u for n, u in accepted.items() if n not in refused}
        log = {"replies": len(replies),
               "accepted": {n: {"rank": u[1], "examples": u[2], "norm": norms[n]}
                            for n, u in kept.items()},
               "refused": refused, "declined": declined}
        return Gathered(*self.plain_target(kept), log) if kept else Gathered(None, [], 0.0, log)

    def plain_target(self, kept: dict[str, tuple[dict[str, np.ndarray], int, int, float]]
                     ) -> tuple[dict[str, np.ndarray], list[int], float]:
        """B', the ranks and the room (see Gathered) of updates seen in the clear:
        {node: (change to B, rank, examples, noise multiplier)}."""
        policy, old = self.policy, self.shared
        if policy.mode == "central":
            target = rounds.central_mean_b(
                old, [(delta, rank) for delta, rank, _, _ in kept.values()], policy.clip_norm,
                policy.noise_multiplier, policy.expected_nodes,
                np.random.default_rng(secrets.randbits(128)))
        else:
            target = rounds.mean_b(old, [(delta, rank, examples) for delta, rank,
                                         examples, _ in kept.values()])
        # What the updates could change without noise (see check); with DP noise, judged
        # by the public bound only: the decision must not reveal an update.
        room = max(float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2))
                                     for d in u[0].values()))) for u in kept.values()) \
            if policy.mode == "none" else 2 * policy.clip_norm
        return target, sorted({u[1] for u in kept.values()}), room

    def secure_updates(self, grid: Grid, round_number: int, nodes: list[int]) -> Gathered:
        """Only the round's sum, through secure aggregation (secagg.py): no update can be
        checked alone, so the aggregate's checks (combine) are all there is."""
        s, policy = self.settings, self.policy
        payload = self._payload(round_number)
        modules = sorted(self.shapes)
        # Devices clip to norm C, so no coordinate exceeds C; their noise (distributed or
        # local DP) may add up to 6 standard deviations.
        clip_range = s.clip_norm * (1.0 + 6.0 * policy.device_noise)
        summed = secagg.secure_mean(
            self.send(grid), nodes, RecordDict({"config": payload["config"]}), payload,
            [(self.shapes[m][0], s.rank) for m in modules], clip_range,
            group_id=str(round_number))
        ranks = {}
        for node, reply in summed.replies.items():
            try:
                ranks[str(node)] = int(reply.content["fitres.metrics"]["rank"])
            except (KeyError, TypeError, ValueError):
                ranks[str(node)] = s.rank  # its vector is in the sum; count it at full rank
            ranks[str(node)] = min(max(ranks[str(node)], 1), s.rank)
        log = {"replies": len(summed.replies) + len(summed.declined),
               "accepted": {n: {"rank": r} for n, r in ranks.items()}, "refused": {},
               "declined": {str(n): why for n, why in summed.declined.items()}}
        if summed.mean is None:
            return Gathered(None, [], 0.0, log, summed.problem)
        mean_delta = dict(zip(modules, summed.mean, strict=True))
        if policy.mode == "distributed":  # DP-FedAvg's fixed denominator, as central
            target = {m: b0.astype(np.float64) + mean_delta[m] * len(ranks)
                      / policy.expected_nodes for m, (b0, _) in self.shared.items()}
        else:
            target = rounds.mean_b_of_sum(self.shared, mean_delta, list(ranks.values()))
        room = s.clip_norm if policy.mode == "none" else 2 * s.clip_norm
        return Gathered(target, sorted(set(ranks.values())), room, log)

    def combine(self, round_number: int, target: dict[str, np.ndarray], ranks: list[int],
                room: float) -> dict:
        """Make the round's average B' (`target`, against the shared A) the shared adapter,
        moved only as far towards it as every device's gate accepts (SERVER_STEPS); else
        keep the old one. Returns the round log's fields about it."""
        old = self.shared
        problem, facts = None, {}
        for step in SERVER_STEPS:
            candidate = rounds.toward(old, target, step, seed=round_number)
            problem, facts = self.check(old, candidate, ranks, room)
            if problem is None:
                self.shared = candidate
                return {"published": True, "withheld": None, "step": step, **facts}
            if "perplexity_rise" not in facts:
                break  # the size check failed: a smaller step of the same change is no better
        else:
            problem = f"{problem}, even moved {SERVER_STEPS[-1]:g} of the way"
        return {"published": False, "withheld": problem, **facts}

    def check(self, old: rounds.Shared, candidate: rounds.Shared, ranks: list[int],
              room: float) -> tuple[str | None, dict]:
        """Why some device would refuse `candidate`, or None; and what was measured.

        Its change to the weights against what the updates could make without noise
        (`room`: an average of changes of norm <= C moves W by <= C; plus, with FlexLoRA's
        products, the old adapter's directions some devices did not train; DP noise may add
        as much again), then general-text perplexity at every rank the round's devices use,
        with the server's copy of the base model (llama.cpp, the devices' own gate)."""
        policy = self.policy
        change = rounds.change_norm(old, candidate)
        fixed_denominator = policy.mode in ("central", "distributed")
        bound = (0.0 if fixed_denominator else rounds.norm(old)) + room
        facts: dict[str, Any] = {"change_norm": round(change, 4),
                                 "norm_bound": round(bound * 1.001, 4)}
        if change > bound * 1.001:
            return (f"not published: the aggregate changes the weights by {change:.3g}, over"
                    f" the {bound:.3g} the updates allow without noise"
                    + (f" (DP noise x{policy.noise_multiplier:.2f} on {policy.expected_nodes}"
                       " devices dominates it)" if policy.mode != "none" else "")), facts
        rises = self.perplexity_rises(candidate, ranks)
        facts["perplexity_rise"] = {str(r): round(v, 4) for r, v in rises.items()}
        refusing = [r for r, rise in rises.items() if rise > self.settings.perplexity_margin]
        if refusing:
            worst = max(rises.values())
            return (f"not published: general-text perplexity would rise {worst:+.1%} at rank"
                    f" {', '.join(map(str, refusing))}, over the"
                    f" {self.settings.perplexity_margin:+.0%} devices accept"), facts
        return None, facts

    def perplexity_rises(self, candidate: rounds.Shared, ranks: list[int]) -> dict[int, float]:
        """General-text perplexity rise of `candidate` cut to each rank (zero: 0)."""
        from floe_app.personalize.export import peft_state, write_gguf_adapter
        from floe_app.personalize.trainer import base_model_of

        rises = {}
        for rank in ranks:
            start = rounds.device_start(candidate, rank)
            if not any(b.any() for b, _ in start.values()):
                rises[rank] = 0.0
                continue
            path = write_gguf_adapter(self.settings.state_dir / f"check-rank-{rank}.gguf",
                                      peft_state(start), alpha=rank,
                                      base=base_model_of(self.base.metadata))
            try:
                rises[rank] = perplexity_rise(self.base, path,
                                              self.settings.state_dir / "base-perplexity.json",
                                              threads=1)
            finally:
                path.unlink(missing_ok=True)
        return rises

    def unpack(self, reply: Message) -> tuple[Any, str | None]:
        """(delta B by module, rank, examples, noise multiplier), or why it is refused."""
        try:
            arrays = {k: a.numpy() for k, a in reply.content["update"].items()}
            metrics = dict(reply.content["metrics"])
        except Exception as exc:  # any malformed reply is one refused update, not a crash
            return None, f"malformed reply ({type(exc).__name__}: {exc})"
        return validate.update_problem(arrays, metrics, self.shapes, self.settings.rank,
                                       self.policy.device_noise)
