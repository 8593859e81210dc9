"""Floe's Flower ServerApp: rounds of FlexLoRA over devices of different ranks.

Each round every connected node gets the shared adapter and the round's settings; it
answers with a clipped, noised change to the first `rank` columns of B, or declines.
Updates with wrong keys, shapes or values, or a norm far outside the round's, are refused
and the round completes with the rest. The shared adapter and a JSON line per round are
written to the state folder after every round, so a run started again after a SuperLink
restart carries on from the last completed round. After the last round every node gets
the final adapter to keep.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from floe_app.engine.local import resolve_model_path
from floe_app.federated import rounds, validate
from floe_app.federated.client import LocalBase
from floe_app.paths import private_umask

app = ServerApp()


@dataclass(frozen=True)
class Settings:
    """The run config ([tool.flwr.app.config] of the bundle, overridden by floe federation
    serve)."""

    rounds: int  # total rounds of the shared adapter, counting those done before a restart
    rank: int
    clip_norm: float
    noise_multiplier: float
    steps: int
    learning_rate: float
    min_nodes: int
    round_timeout: float
    state_dir: Path
    model: str

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> Settings:
        return cls(int(config["rounds"]), int(config["rank"]), float(config["clip-norm"]),
                   float(config["noise-multiplier"]), int(config["steps"]),
                   float(config["learning-rate"]), int(config["min-nodes"]),
                   float(config["round-timeout"]), Path(str(config["state-dir"])),
                   str(config.get("model", "")))


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
                "learning-rate": s.learning_rate, "base-model": self.base.identity}),
        })

    def _nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.settings.round_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.settings.min_nodes or time.monotonic() > deadline:
                return nodes
            time.sleep(1.0)

    def run(self, grid: Grid) -> None:
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
        payload = self._payload(round_number)
        messages = [Message(payload, node, "train", group_id=str(round_number))
                    for node in nodes]
        try:
            replies = list(grid.send_and_receive(messages, timeout=self.settings.round_timeout))
        except Exception as exc:  # the SuperLink failed mid-round (seen: its SQLite locked)
            # The shared adapter stays as it was; the next round starts afresh (late replies
            # to this one are for messages nobody waits on any more).
            self._log({"event": "round", "round": round_number, "nodes": len(nodes),
                       "error": f"{type(exc).__name__}: {exc}"[:300],
                       "seconds": round(time.monotonic() - started, 1)})
            return
        accepted, norms, declined, refused = {}, {}, {}, {}
        for reply in replies:
            node = str(reply.metadata.src_node_id)
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
        if kept:
            self.shared = rounds.aggregate(
                self.shared, [(delta, rank, examples) for delta, rank, examples, _ in
                              kept.values()], seed=round_number)
        version = self._save(round_number)
        self._log({"event": "round", "round": round_number, "nodes": len(nodes),
                   "replies": len(replies), "seconds": round(time.monotonic() - started, 1),
                   "accepted": {n: {"rank": u[1], "examples": u[2], "norm": norms[n]}
                                for n, u in kept.items()},
                   "refused": refused, "declined": declined,
                   "version": version, "settings": {k: str(v) if isinstance(v, Path) else v
                                                    for k, v in asdict(self.settings).items()}})

    def unpack(self, reply: Message) -> tuple[Any, str | None]:
        """(delta B by module, rank, examples, noise multiplier), or why it is refused."""
        try:
            arrays = {k: a.numpy() for k, a in reply.content["update"].items()}
            metrics = dict(reply.content["metrics"])
        except Exception as exc:  # any malformed reply is one refused update, not a crash
            return None, f"malformed reply ({type(exc).__name__}: {exc})"
        return validate.update_problem(arrays, metrics, self.shapes, self.settings.rank,
                                       self.settings.noise_multiplier)
