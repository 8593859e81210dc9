"""One training job: store -> examples -> LoRA -> GGUF -> evaluation gate -> registry.

Runs in its own process (`floe train`, or started in the background by the chat at low
priority), never in the UI process; one job at a time. It waits between steps while a
reply is being generated, checkpoints as it goes (a killed job resumes), and writes the
adapter into the registry only once it is complete and evaluated.

The gate: a new version is promoted only if general-text perplexity rises at most
`learning.perplexity_margin` over the base model, and recall on held-out questions about
remembered facts is no worse than the active version's. Otherwise it is kept, unused, with
the reason. Each job trains from scratch on everything there is to learn, so an example
the user deletes is forgotten by the next version.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from floe_app.config import Config
from floe_app.engine.local import LocalEngine
from floe_app.engine.sampling import Sampling
from floe_app.errors import FloeError
from floe_app.paths import Paths
from floe_app.personalize.data import Dataset, build_dataset
from floe_app.personalize.learning import nothing_new
from floe_app.personalize.registry import Registry
from floe_app.personalize.status import (
    TrainingStatus,
    training_lock,
    wait_for_the_user,
    write_status,
)
from floe_app.personalize.tiers import Tier, tier_for
from floe_app.store.db import AdapterRow, Store

RECALL_TOKENS = 32
TRAINING_MODULES = ("torch", "transformers", "peft", "gguf")
# Weight of the anchor KL term; a run whose perplexity rise fails the gate is trained once
# more with the stronger one (measured: one fact in three otherwise fails it).
ANCHOR_WEIGHTS = (5.0, 20.0)


@dataclass
class JobResult:
    state: str  # done | skipped
    message: str
    adapter: AdapterRow | None = None


def bundled_text(name: str) -> str:
    """general_text.txt: the gate's perplexity text; anchor_text.txt: what training keeps
    the model's distribution on (different texts, so the gate is not trained on)."""
    return resources.files("floe_app.personalize").joinpath(name).read_text(encoding="utf-8")


def run_training(paths: Paths, config: Config, model_path: Path, *, force: bool = False,
                 tier_name: str | None = None, steps: int | None = None,
                 progress: Callable[[TrainingStatus], None] | None = None) -> JobResult:
    """Train, evaluate and register a new adapter version. Raises FloeError on failure."""
    data_dir = paths.data_dir
    status = TrainingStatus("starting", pid=os.getpid())

    def report(**changes: Any) -> None:
        for key, value in changes.items():
            setattr(status, key, value)
        write_status(data_dir, status)
        if progress is not None:
            progress(status)

    with training_lock(data_dir):
        store = Store(paths.database)
        try:
            if config.learning.paused and not force:
                raise FloeError("learning is paused (learning.paused = true): resume it in"
                                " settings (F2), or floe train --force")
            dataset = build_dataset(store.memories(), store.taught_replies())
            if not dataset.examples:
                raise FloeError("nothing to learn from yet: /remember a fact, or give a reply"
                                " a thumbs up or a correction")
            status.fingerprint = dataset.fingerprint
            versions = store.adapters()
            if not force and nothing_new(dataset, versions):
                message = f"Nothing new to learn since v{versions[-1].version}."
                report(state="skipped", message=message)
                return JobResult("skipped", message)
            missing = [m for m in TRAINING_MODULES if importlib.util.find_spec(m) is None]
            if missing:
                raise FloeError(f"training needs torch, transformers, peft and gguf"
                                f" ({', '.join(missing)} missing): pipx install"
                                " 'floe-assistant[train]'")
            tier, why = tier_for(config.learning, tier_name)
            result = _train_and_gate(paths, config, model_path, store, dataset, tier, why,
                                     steps, report)
        except FloeError as exc:
            report(state="failed", message=str(exc))
            raise
        except OSError as exc:
            message = (f"training could not write its files ({exc.strerror or exc});"
                       " the active adapter stays in use")
            report(state="failed", message=message)
            raise FloeError(message) from exc
        finally:
            store.close()
        report(state="done", message=result.message)
        return result


def _train_and_gate(paths: Paths, config: Config, model_path: Path, store: Store,
                    dataset: Dataset, tier: Tier, why: str, steps: int | None,
                    report: Callable[..., None]) -> JobResult:
    from floe_app.personalize.export import write_gguf_adapter
    from floe_app.personalize.trainer import (
        TrainConfig,
        base_model_of,
        load_base,
        perplexity,
        train_lora,
    )

    started = time.monotonic()
    work = paths.cache_dir / "training"
    work.mkdir(parents=True, exist_ok=True)
    train_config = TrainConfig(rank=tier.rank, alpha=tier.alpha, targets=tier.targets,
                               steps=steps or tier.steps_for(len(dataset.examples)),
                               batch=tier.batch, max_tokens=tier.max_tokens,
                               threads=tier.threads, learning_rate=2e-3, stop_loss=0.1)
    report(state="loading", steps=train_config.steps,
           message=f"Loading the base model ({tier.name} tier)")
    model, tokenizer = load_base(model_path, paths.cache_dir)
    # Trained without the system prompt (half the tokens, twice the speed); recall is
    # checked with it, as the chat asks.
    system = {"role": "system", "content": config.chat.system_prompt}
    pairs = [([{"role": "user", "content": e.prompt}], e.answer) for e in dataset.examples]
    text = bundled_text("general_text.txt")
    perplexity_base = perplexity(model, tokenizer, text)
    evaluated: dict[str, float] = {}

    train_started = time.monotonic()
    resumed_at = 0  # the step a checkpoint let this job start from
    for anchor_weight in ANCHOR_WEIGHTS:
        train_config = dataclasses.replace(train_config, anchor_weight=anchor_weight)
        result = train_lora(
            model, tokenizer, pairs, train_config,
            progress=lambda step, loss: report(state="training", step=step, loss=loss),
            checkpoint=work / "checkpoint.pt",
            checkpoint_key=f"{dataset.fingerprint}:{train_config}",
            before_step=lambda: wait_for_the_user(
                paths.data_dir, lambda waiting: report(state="paused" if waiting else "training")),
            after=lambda tuned: evaluated.update(perplexity=perplexity(tuned, tokenizer,
                                                                       text)),
            anchor_text=bundled_text("anchor_text.txt"))
        resumed_at = resumed_at or result.resumed_at
        if evaluated["perplexity"] / perplexity_base - 1 <= config.learning.perplexity_margin:
            break
    train_seconds = time.monotonic() - train_started

    report(state="evaluating", message="Checking the new adapter")
    engine = LocalEngine.load(model_path, threads=tier.threads, context_tokens=1024)
    try:
        base = base_model_of(engine.metadata)
        staged = write_gguf_adapter(work / "candidate.gguf", result.state,
                                    alpha=train_config.alpha, base=base)
        registry = Registry(store, paths.adapters_dir)
        active = registry.active()
        usable = active if active is not None and registry.problem(active) is None else None
        recall_new = _recall(engine, dataset, system, staged)
        recall_before = _recall(engine, dataset, system, Path(usable.path) if usable else None)
    finally:
        engine.close()

    rise = evaluated["perplexity"] / perplexity_base - 1
    reasons = gate_reasons(rise, config.learning.perplexity_margin, recall_before, recall_new)
    counts = {source: len(items) for source, items in dataset.by_source().items()}
    meta = {
        "tier": tier.name, "tier_reason": why, "rank": tier.rank,
        "targets": list(tier.targets), "examples": counts, "steps": len(result.losses),
        "max_steps": train_config.steps, "anchor_weight": train_config.anchor_weight,
        "resumed_at": resumed_at, "loss_first": result.losses[0],
        "loss_last": result.losses[-1], "recall": recall_new, "recall_before": recall_before,
        "heldout": len(dataset.heldout), "perplexity": evaluated["perplexity"],
        "perplexity_base": perplexity_base, "fingerprint": dataset.fingerprint,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(result.tokens / train_seconds, 1) if train_seconds else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    row = registry.register(staged, base_model=base.identity,
                            status="rejected" if reasons else "promoted",
                            reason="; ".join(reasons), meta=meta)
    (work / "checkpoint.pt").unlink(missing_ok=True)
    if reasons:
        message = f"v{row.version} kept but not used: {row.reason}."
    else:
        recall = "" if recall_new is None else f", recall {recall_new:.0%}"
        message = (f"v{row.version} in use: learned {len(dataset.examples)} examples"
                   f"{recall}, perplexity {rise:+.1%}.")
    return JobResult("done", message, row)


def gate_reasons(perplexity_rise: float, margin: float, recall_before: float | None,
                 recall_after: float | None) -> list[str]:
    """Why a new version must not be used; empty when it passes the gate."""
    reasons = []
    if perplexity_rise > margin:
        reasons.append(f"general-text perplexity rose {perplexity_rise:+.1%} (limit"
                       f" {margin:+.0%})")
    if recall_before is not None and recall_after is not None and recall_after < recall_before:
        reasons.append(f"recall on held-out questions fell from {recall_before:.0%} to"
                       f" {recall_after:.0%}")
    return reasons


def _recall(engine: LocalEngine, dataset: Dataset, system: dict[str, str],
            adapter: Path | None) -> float | None:
    """Share of held-out questions answered right, greedily, with no notes in context."""
    if not dataset.heldout:
        return None
    engine.set_adapter(adapter)
    right = 0
    for question in dataset.heldout:
        tokens = engine.chat_tokens([system, {"role": "user", "content": question.question}])
        answer = "".join(step.text for step in engine.generate(
            tokens, Sampling(temperature=0, max_tokens=RECALL_TOKENS)))
        right += question.is_recalled_by(answer)
    return right / len(dataset.heldout)
