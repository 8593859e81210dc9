"""LoRA training with torch + peft on the base weights the chat uses. Short on purpose.

transformers reads the same GGUF file llama.cpp runs (dequantized to float32, ~15 s for
SmolLM2-135M); the result is cached as safetensors so later runs start in about a second.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from floe_app.engine.compute import runs_on_compute_thread
from floe_app.engine.hardware import cpu_monitor, threads_for
from floe_app.engine.local import base_identity
from floe_app.personalize.export import BaseModel, peft_state

CHECKPOINT_EVERY = 10
STOP_WINDOW = 8


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 30
    batch: int = 4
    learning_rate: float = 2e-3
    max_tokens: int = 96
    seed: int = 0
    threads: int = 2
    # Stop once the mean loss of the last STOP_WINDOW steps is below this (0: never). Past
    # that point the model only drifts further from the base for nothing it did not know.
    stop_loss: float = 0.0
    # Weight of KL(base || tuned) over an unrelated anchor text, added to every step's loss:
    # learning a fact should not change how the model writes everything else.
    anchor_weight: float = 0.0
    # False: A stays as given and only B learns (the shared adapter's rounds: the server
    # can then rebuild every device's product exactly).
    train_a: bool = True


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]
    losses: list[float] = field(default_factory=list)
    resumed_at: int = 0  # the step a checkpoint let this run start from
    tokens: int = 0  # tokens read (prompt and answer) by the steps this run took


def base_model_of(metadata: dict[str, str]) -> BaseModel:
    """The head layout the export needs, from the GGUF metadata llama.cpp reports."""
    arch = metadata["general.architecture"]
    return BaseModel(identity=base_identity(metadata), arch=arch,
                     n_head=int(metadata[f"{arch}.attention.head_count"]),
                     n_head_kv=int(metadata[f"{arch}.attention.head_count_kv"]))


@runs_on_compute_thread
def load_base(gguf_path: Path, cache_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 from the GGUF, cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # progress bars and notices are noise in a background job
    logging.disable_progress_bar()
    stat = gguf_path.stat()
    cached = cache_dir / "base" / f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (cached / "config.json").exists():
        return (AutoModelForCausalLM.from_pretrained(cached),
                AutoTokenizer.from_pretrained(cached))
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are plain float32 now; transformers only refuses to save them because it
    # remembers they came from a GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Saved aside and renamed into place: another Floe process (a federated round, say) may
    # be reading or writing the same cache.
    partial = cached.with_name(f"{cached.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(cached)
    except OSError:  # another process got there first: theirs is as good
        shutil.rmtree(partial, ignore_errors=True)
    return model, tokenizer


def encode(tokenizer: Any, prompt: list[dict[str, str]], answer: str,
           max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example; only the answer's tokens are learned."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    head = list(head["input_ids"] if hasattr(head, "keys") else head)  # BatchEncoding or list
    body = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (head + body)[:max_tokens]
    labels = ([-100] * len(head) + body)[:max_tokens]
    return ids, labels


def lora_config(config: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha,
                      target_modules=list(config.targets), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")


@runs_on_compute_thread
def train_lora(model: Any, tokenizer: Any, examples: list[tuple[list[dict[str, str]], str]],
               config: TrainConfig, progress: Callable[[int, float], None] | None = None, *,
               checkpoint: Path | None = None, checkpoint_key: str = "",
               before_step: Callable[[], None] | None = None,
               after: Callable[[Any], None] | None = None,
               anchor_text: str = "",
               init: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> TrainResult:
    """Train a LoRA on (prompt messages, answer) pairs; returns its weights.

    It starts fresh (peft's initialisation), or from `init`: {module: (B, A)} with the
    module named as export.peft_factors names it.

    With `checkpoint`, the state is saved every few steps and a run with the same
    `checkpoint_key` (same examples and settings) continues from it. `before_step` runs
    before every step (the background job waits there while the user chats); `after`
    gets the trained peft model before it is unloaded (evaluation).
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    # peft cannot find a hub config for a GGUF-loaded base, and says so at every save.
    warnings.filterwarnings("ignore", message="Could not find a config file")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    monitor = cpu_monitor()
    anchor = None
    if anchor_text and config.anchor_weight > 0:
        anchor = torch.tensor([tokenizer(anchor_text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():  # the base is frozen: its distribution is computed once
            anchor_base = torch.log_softmax(model(input_ids=anchor).logits.float(), -1)
    peft_model = get_peft_model(model, lora_config(config))
    if init is not None:
        set_peft_model_state_dict(peft_model, {
            key: torch.from_numpy(np.ascontiguousarray(value))
            for key, value in peft_state(init, get_peft_model_state_dict(peft_model)).items()})
    if not config.train_a:
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name:
                parameter.requires_grad_(False)
    encoded = [encode(tokenizer, prompt, answer, config.max_tokens)
               for prompt, answer in examples]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                  lr=config.learning_rate)
    result = TrainResult({})
    if checkpoint is not None and checkpoint.exists():
        try:
            saved = torch.load(checkpoint, weights_only=True)
        except Exception:  # a checkpoint torn by a crash: start over
            saved = {}
        if saved.get("key") == checkpoint_key:
            set_peft_model_state_dict(peft_model, saved["lora"])
            optimizer.load_state_dict(saved["optimizer"])
            result.losses, result.resumed_at = list(saved["losses"]), int(saved["step"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    peft_model.train()
    try:
        for step in range(result.resumed_at, config.steps):
            if before_step is not None:
                before_step()
            # Up to config.threads, one per core other programs leave free: measured with
            # one of 2 cores busy, 2 threads trained at 0.26-0.40 steps/s and 1 at 0.81.
            torch.set_num_threads(threads_for(monitor.free_cores(), config.threads))
            # Batches depend only on (seed, step), so a resumed run sees what it would have.
            rng = random.Random(config.seed * 1_000_003 + step)
            batch = [encoded[rng.randrange(len(encoded))] for _ in range(config.batch)]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            total = loss
            if anchor is not None:
                tuned = torch.log_softmax(peft_model(input_ids=anchor).logits.float(), -1)
                kl = torch.nn.functional.kl_div(tuned, anchor_base, log_target=True,
                                                reduction="batchmean") / anchor.shape[1]
                total = loss + config.anchor_weight * kl
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            result.losses.append(loss.detach().item())
            result.tokens += int(mask.sum())
            if checkpoint is not None and ((step + 1) % CHECKPOINT_EVERY == 0):
                _save_checkpoint(checkpoint, {
                    "key": checkpoint_key, "step": step + 1, "losses": result.losses,
                    "lora": get_peft_model_state_dict(peft_model),
                    "optimizer": optimizer.state_dict()})
            if progress is not None:
                progress(step + 1, result.losses[-1])
            recent = result.losses[-STOP_WINDOW:]
            if len(recent) == STOP_WINDOW and sum(recent) / STOP_WINDOW < config.stop_loss:
                break
        result.state = {k: v.detach().cpu().numpy()
                        for k, v in get_peft_model_state_dict(peft_model).items()}
        if after is not None:
            peft_model.eval()
            after(peft_model)
    finally:
        peft_model.unload()  # leaves the base model as it was, for the next run
    return result


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


@runs_on_compute_thread
def perplexity(model: Any, tokenizer: Any, text: str) -> float:
    """exp(mean negative log-likelihood) of `text` under `model`, one window."""
    import torch

    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss))
