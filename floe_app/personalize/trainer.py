"""LoRA training with torch + peft on the base weights the chat uses. Short on purpose.

transformers reads the same GGUF file llama.cpp runs (dequantized to float32, ~15 s for
SmolLM2-135M); the result is cached as safetensors so later runs start in about a second.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from floe_app.personalize.export import BaseModel


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


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]
    losses: list[float] = field(default_factory=list)


def base_model_of(metadata: dict[str, str]) -> BaseModel:
    """The head layout the export needs, from the GGUF metadata llama.cpp reports."""
    arch = metadata["general.architecture"]
    return BaseModel(name=metadata.get("general.name", ""), arch=arch,
                     n_head=int(metadata[f"{arch}.attention.head_count"]),
                     n_head_kv=int(metadata[f"{arch}.attention.head_count_kv"]))


def load_base(gguf_path: Path, cache_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 from the GGUF, cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    model.save_pretrained(cached)
    tokenizer.save_pretrained(cached)
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


def train_lora(model: Any, tokenizer: Any, examples: list[tuple[list[dict[str, str]], str]],
               config: TrainConfig, progress: Callable[[int, float], None] | None = None
               ) -> TrainResult:
    """Train a fresh LoRA on (prompt messages, answer) pairs; returns its weights."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    peft_model = get_peft_model(model, LoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    encoded = [encode(tokenizer, prompt, answer, config.max_tokens)
               for prompt, answer in examples]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                  lr=config.learning_rate)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = TrainResult({})
    peft_model.train()
    for step in range(config.steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(config.batch)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result.losses.append(loss.detach().item())
        if progress is not None:
            progress(step + 1, result.losses[-1])
    result.state = {k: v.detach().cpu().numpy()
                    for k, v in get_peft_model_state_dict(peft_model).items()}
    peft_model.unload()  # leaves the base model as it was, for the next run
    return result
