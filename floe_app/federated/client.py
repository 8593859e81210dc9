"""A device's part in a federated round, without Flower (client_app.py wraps it).

Before anything is trained or sent: the user has opted in, is not chatting, the machine is
on power and not training its personal adapter, the privacy budget allows one more upload,
there is something shareable to learn from, and the shared adapter from the server passes
our checks. Then: train the first `rank` columns of B (A frozen, see rounds.py) on what
the user lets the federation learn from (accepted replies and corrections, never memory
notes or private conversations), clip and noise the change, record it in the ledger, and
hand it over. Opting out between training and sending still stops the upload.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from floe_app.config import Config, FederationSettings, load_config
from floe_app.engine.local import LocalEngine, base_identity
from floe_app.errors import FloeError
from floe_app.federated import dp, privacy, rounds, validate
from floe_app.paths import Paths
from floe_app.personalize.data import build_dataset
from floe_app.personalize.status import someone_replying, training_lock, wait_for_the_user
from floe_app.personalize.tiers import probe, tier_for
from floe_app.store.db import Store, TaughtReply

ANCHOR_WEIGHT = 5.0  # as personal training: the shared adapter must not bend general text


class Declined(FloeError):
    """This device does not take part in this round (the reason is shown and recorded)."""


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks for a round (its config record), checked before use."""

    federation: str
    run_id: int
    round: int
    rank: int  # the shared adapter's rank (devices train a prefix of it)
    clip_norm: float
    noise_multiplier: float
    steps: int
    learning_rate: float
    base_model: str
    policy: privacy.Policy | None = None  # the federation's privacy (privacy.py)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], federation: str, run_id: int) -> RoundPlan:
        try:
            plan = cls(federation, int(run_id), int(record["round"]), int(record["rank"]),
                       float(record["clip-norm"]), float(record["noise-multiplier"]),
                       int(record["steps"]), float(record["learning-rate"]),
                       str(record["base-model"]), privacy.Policy.from_record(record))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise Declined(f"malformed round instructions ({exc!r})") from None
        if not (1 <= plan.rank <= 256 and plan.clip_norm > 0 and plan.noise_multiplier >= 0
                and 0 <= plan.steps <= 1000 and 0 < plan.learning_rate < 1
                and math.isfinite(plan.clip_norm) and math.isfinite(plan.noise_multiplier)):
            raise Declined(f"round instructions out of range: {plan}")
        return plan


@dataclass
class Upload:
    delta: dict[str, np.ndarray]  # module -> change to B (out x rank), clipped and noised
    rank: int
    examples: int
    epsilon: float | None  # spent after this upload at federation.delta; None: no DP noise
    noise_multiplier: float  # added on this device (the metric the server checks)
    mode: str = "local"  # the federation's privacy mode (privacy.py)
    release_noise: float | None = None  # of the DP release it is part of (None: as added)
    masked: bool = False  # sent through secure aggregation (padded to the shared rank)


@dataclass(frozen=True)
class LocalBase:
    path: Path
    metadata: dict[str, str]

    @property
    def identity(self) -> str:
        return base_identity(self.metadata)

    @classmethod
    def read(cls, model_path: Path) -> LocalBase:
        engine = LocalEngine.load(model_path, threads=1, context_tokens=256)
        try:
            return cls(model_path, dict(engine.metadata))
        finally:
            engine.close()


def shareable(config: Config, replies: list[TaughtReply]) -> list[TaughtReply]:
    """The replies the user lets the federation learn from (settings federation.share_*)."""
    return [r for r in replies
            if (r.correction is not None and config.federation.share_corrections)
            or (r.correction is None and r.rating == 1 and config.federation.share_replies)]


def spent_multipliers(store: Store) -> list[float]:
    """The noise multipliers of the DP releases this device's uploads were part of (uploads
    without DP noise spend no epsilon: they have no formal guarantee at all)."""
    return [float(r.noise_multiplier) for r in store.federation_rounds()
            if r.outcome == "uploaded" and (r.noise_multiplier or 0.0) > 0]


def policy_problem(policy: privacy.Policy, federation: FederationSettings) -> str | None:
    """Why this device's settings (federation.require, federation.min_noise_multiplier)
    do not accept a federation run under `policy`, or None."""
    require, least = federation.require, federation.min_noise_multiplier
    if require == "secure_aggregation" and not policy.secure_aggregation:
        return ("federation.require = secure_aggregation: this federation has no secure"
                " aggregation (its operator would see this device's change)")
    if require == "formal_dp" and policy.mode == "none":
        return ("federation.require = formal_dp: this federation adds no DP noise"
                f" ({policy.reason})")
    if require == "local_dp" and policy.mode != "local":
        return ("federation.require = local_dp: this federation does not have devices add"
                " the noise themselves")
    if least > 0 and policy.mode != "local" and policy.noise_multiplier < least:
        return (f"federation.min_noise_multiplier = {least:g}: this federation's DP noise is"
                f" x{policy.noise_multiplier:g}" + (" (none)" if policy.mode == "none" else ""))
    return None


def check_shared(shared_arrays: dict[str, np.ndarray], plan: RoundPlan,
                 base: LocalBase) -> rounds.Shared:
    """The server's shared adapter as factors, or Declined naming what is wrong with it."""
    problem = validate.base_problem(plan.base_model, base.identity)
    if problem is None:
        expected = {}
        for module, (out, width) in rounds.model_shapes(base.metadata).items():
            expected[f"{module}.B"] = (out, plan.rank)
            expected[f"{module}.A"] = (plan.rank, width)
        problem = validate.arrays_problem(shared_arrays, expected)
    if problem is not None:
        raise Declined(f"refused the shared adapter: {problem}")
    return {m: (shared_arrays[f"{m}.B"], shared_arrays[f"{m}.A"])
            for m in rounds.model_shapes(base.metadata)}


def perplexity_rise(base: LocalBase, adapter: Path, known: Path, threads: int) -> float:
    """How much `adapter` raises general-text perplexity over the base (llama.cpp, the
    personal gate's paragraph): 0.05 = +5%. The base's own perplexity never changes: it is
    computed once and kept in `known`. The devices' gate and the server's check."""
    from floe_app.personalize.job import bundled_text

    text = bundled_text("general_text.txt")
    key = hashlib.sha256(f"{base.identity}\n{text}".encode()).hexdigest()
    try:
        saved = json.loads(known.read_text())
    except (OSError, ValueError):
        saved = {}
    engine = LocalEngine.load(base.path, threads=threads, context_tokens=1024)
    try:
        if key not in saved:
            saved = {key: engine.perplexity(text)}
            known.write_text(json.dumps(saved))
        engine.set_adapter(adapter)
        return engine.perplexity(text) / saved[key] - 1
    finally:
        engine.close()


def install_shared(paths: Paths, store: Store, shared: rounds.Shared, plan: RoundPlan,
                   rank: int, base: LocalBase, perplexity_margin: float) -> Path | None:
    """Keep the shared adapter at this device's rank for the chat (None while it is zero).

    Like a personal version, it must not raise general-text perplexity by more than
    `perplexity_margin` (llama.cpp, the gate's paragraph): a federation's adapter drowned
    in DP noise, or a poisoned one, is refused and the chat keeps what it had."""
    from floe_app.personalize.export import peft_state, write_gguf_adapter
    from floe_app.personalize.registry import sha256_of
    from floe_app.personalize.trainer import base_model_of

    start = rounds.device_start(shared, rank)
    if not any(b.any() for b, _ in start.values()):
        return None
    folder = paths.data_dir / "shared"
    staged = write_gguf_adapter(folder / "incoming.gguf", peft_state(start), alpha=rank,
                                base=base_model_of(base.metadata))
    rise = perplexity_rise(base, staged, paths.cache_dir / "federation-base-perplexity.json",
                           training_threads(paths))
    if rise > perplexity_margin:
        staged.unlink()
        raise Declined(f"refused the shared adapter: general-text perplexity rose {rise:+.1%}"
                       f" (limit {perplexity_margin:+.0%})")
    digest = sha256_of(staged)
    target = folder / f"shared-{digest[:16]}.gguf"
    staged.replace(target)
    if not any(row.sha256 == digest for row in store.shared_adapters()):
        store.add_shared_adapter(federation=plan.federation, run_id=str(plan.run_id),
                                 round_number=plan.round, path=str(target), sha256=digest,
                                 size=target.stat().st_size, rank=rank,
                                 base_model=base.identity)
    return target


def take_part(paths: Paths, model_path: Path, plan: RoundPlan,
              shared_arrays: dict[str, np.ndarray], node_rank: int,
              masked: bool = False) -> Upload:
    """One round on this device. Raises Declined (recorded) when it does not take part.
    `masked`: the upload goes through secure aggregation (client_app.py masks it)."""
    store = Store(paths.database)
    try:
        return _take_part(paths, store, model_path, plan, shared_arrays, node_rank, masked)
    except Declined as exc:
        record_declined(store, plan, node_rank, exc)
        raise
    finally:
        store.close()


def record_declined(store: Store, plan: RoundPlan, node_rank: int, reason: Declined) -> None:
    store.add_federation_round(
        federation=plan.federation, run_id=str(plan.run_id), round_number=plan.round,
        rank=node_rank, examples=0, bytes_sent=0, noise_multiplier=None, clip_norm=None,
        outcome="refused" if "refused" in str(reason) else "declined", reason=str(reason))


@dataclass(frozen=True)
class Ready:
    """A device that can take part in a round, and on what terms."""

    config: Config
    dataset: Any  # what it learns from (personalize.data.Dataset)
    added: float  # the noise multiplier this device adds itself (local DP, distributed)
    release: float  # of the DP release its update is part of (0: none)
    epsilon: float | None  # spent after this upload at federation.delta; None: no DP noise


def ready(paths: Paths, store: Store, plan: RoundPlan, masked: bool) -> Ready:
    """Whether this device takes part in `plan`'s round, checked before anything is
    trained (and, under secure aggregation, before it joins the key exchange). Raises
    Declined with the reason."""
    config = _opted_in(paths)
    if plan.policy is not None:
        privacy.remember_policy(paths.data_dir, plan.federation, plan.policy)
        problem = policy_problem(plan.policy, config.federation)
        if problem is not None:
            raise Declined(f"this device's privacy settings: {problem}")
        if plan.policy.secure_aggregation and not masked:
            raise Declined("the server announced secure aggregation but asked for an"
                           " unmasked update")
    if probe().on_battery:
        raise Declined("on battery: rounds run only on power")
    if someone_replying(paths.data_dir):
        raise Declined("the user is chatting")
    policy = plan.policy or privacy.Policy.from_record({
        "noise-multiplier": plan.noise_multiplier, "clip-norm": plan.clip_norm})
    # Noise this device adds itself (local DP, or its share under distributed DP), and the
    # release its update is part of.
    added = policy.device_noise
    if policy.mode == "local":
        added = max(added, config.federation.min_noise_multiplier)
    release = added if policy.mode == "local" else policy.release_noise
    spent = spent_multipliers(store)
    after = dp.epsilon([*spent, release], config.federation.delta) if release > 0 else None
    if after is not None and after > config.federation.max_epsilon:
        raise Declined(f"privacy budget: one more upload would spend epsilon {after:.2f},"
                       f" over federation.max_epsilon = {config.federation.max_epsilon:g}")
    dataset = build_dataset([], shareable(config, store.taught_replies(shareable=True)))
    if not dataset.examples:
        raise Declined("nothing shareable to learn from (thumbs-up replies or corrections"
                       " outside private conversations)")
    return Ready(config, dataset, added, release, after)


def _take_part(paths: Paths, store: Store, model_path: Path, plan: RoundPlan,
               shared_arrays: dict[str, np.ndarray], node_rank: int, masked: bool) -> Upload:
    terms = ready(paths, store, plan, masked)
    base = LocalBase.read(model_path)
    shared = check_shared(shared_arrays, plan, base)
    rank = min(node_rank, plan.rank)
    install_shared(paths, store, shared, plan, rank, base,
                   terms.config.learning.perplexity_margin)
    try:
        with training_lock(paths.data_dir):
            delta = _train(paths, model_path, plan, shared, rank, terms.dataset)
    except FloeError as exc:  # the lock: personal training is running
        raise Declined(f"busy: {exc}") from None
    noised, _ = dp.privatize(delta, plan.clip_norm, terms.added,
                             np.random.default_rng(secrets.randbits(128)))
    _opted_in(paths)  # opting out while this round trained stops the upload
    if masked:  # secure aggregation sums equal shapes: zeros past this device's rank
        noised = {m: np.pad(a, ((0, 0), (0, plan.rank - rank))) for m, a in noised.items()}
    upload = Upload({m: a.astype(np.float32) for m, a in noised.items()}, rank,
                    len(terms.dataset.examples), terms.epsilon, terms.added,
                    plan.policy.mode if plan.policy else "local", terms.release, masked)
    record_upload(store, plan, upload)
    return upload


def training_threads(paths: Paths) -> int:
    """CPU threads a round may use: the training tier's (learning.threads caps them)."""
    return tier_for(load_config(paths)[0].learning)[0].threads


def _opted_in(paths: Paths) -> Config:
    config, _ = load_config(paths)
    if not config.federation.enabled:
        raise Declined("not opted in (federation.enabled = false): nothing is uploaded")
    return config


def record_upload(store: Store, plan: RoundPlan, upload: Upload) -> None:
    """The ledger row and the round's row, written before the upload leaves."""
    floats = sum(a.size for a in upload.delta.values())
    # Masked: quantized to integers and masked modulo 2^32, sent as int64 (secagg.py).
    size = (floats + 1) * 8 if upload.masked else sum(a.nbytes for a in upload.delta.values())
    release = upload.noise_multiplier if upload.release_noise is None else upload.release_noise
    store.add_federation_round(
        federation=plan.federation, run_id=str(plan.run_id), round_number=plan.round,
        rank=upload.rank, examples=upload.examples, bytes_sent=size,
        noise_multiplier=release, clip_norm=plan.clip_norm, outcome="uploaded",
        epsilon=upload.epsilon)
    if upload.noise_multiplier > 0 and upload.mode == "distributed":
        noise = (f"a share of the round's DP noise added here (x{upload.noise_multiplier:.3g};"
                 f" the sum carries x{release:g})")
    elif upload.noise_multiplier > 0:
        noise = f"noise x{upload.noise_multiplier:g} added here"
    elif release > 0:
        noise = f"no noise added here: the server adds x{release:g} to the round's sum"
    else:
        noise = "no DP noise"
    spent = (f"epsilon now {upload.epsilon:.2f}" if upload.epsilon is not None
             else "no formal DP guarantee for this upload")
    if upload.masked:
        sent = (f"{floats:,} numbers: the LoRA B-factor changes at rank {upload.rank}, clipped"
                f" to {plan.clip_norm:g} ({noise}), padded with zeros to rank {plan.rank},"
                " quantized and masked by secure aggregation (the operator sees only the"
                " round's sum); public keys and encrypted key shares for the other devices;"
                " the rank")
    else:
        sent = (f"{len(upload.delta)} LoRA B-factor changes ({floats:,} floats, rank"
                f" {upload.rank}, clipped to {plan.clip_norm:g}, {noise}), the example count"
                f" {upload.examples}")
    ledger = store.record_request(
        endpoint=plan.federation, model=f"federated run {plan.run_id} round {plan.round}",
        purpose="federated", text_sent=f"no text: {sent}; {spent}", bytes_sent=size)
    store.finish_request(ledger, bytes_received=0, outcome="sent")


def _train(paths: Paths, model_path: Path, plan: RoundPlan, shared: rounds.Shared, rank: int,
           dataset: Any) -> dict[str, np.ndarray]:
    """The change this device makes to B in `plan.steps` steps (A frozen)."""
    from floe_app.personalize.export import peft_factors
    from floe_app.personalize.job import bundled_text
    from floe_app.personalize.trainer import TrainConfig, load_base, train_lora

    tier, _ = tier_for(load_config(paths)[0].learning)
    model, tokenizer = load_base(model_path, paths.cache_dir)
    start = rounds.device_start(shared, rank)
    config = TrainConfig(rank=rank, alpha=float(rank), targets=rounds.ATTENTION,
                         steps=plan.steps, batch=tier.batch, learning_rate=plan.learning_rate,
                         max_tokens=tier.max_tokens, threads=tier.threads, seed=plan.round,
                         anchor_weight=ANCHOR_WEIGHT, train_a=False)

    pairs = [([{"role": "user", "content": e.prompt}], e.answer) for e in dataset.examples]
    result = train_lora(model, tokenizer, pairs, config,
                        before_step=lambda: wait_for_the_user(paths.data_dir),
                        anchor_text=bundled_text("anchor_text.txt"), init=start)
    trained = peft_factors(result.state)
    return {m: trained[m][0] - start[m][0] for m in start}
