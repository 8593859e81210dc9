"""Choosing the next token from a distribution: pure functions on numpy arrays.

Two stages. `penalize` turns the model's raw logits into ones that discourage repeating
the reply's own recent tokens (repeat / presence / frequency penalties over a window, and
DRY, which penalizes continuing a sequence that already occurred). The token loop applies it
before any chooser sees the distribution, so plain sampling and the fused decoder both get
it. `sample_token` then draws from the (penalized) log-probabilities: greedy, or top-k,
min-p, top-p and temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

# Characters that end a DRY match: repeating a line break, a list marker or a quote is
# formatting, not a loop (the defaults of the DRY proposal and of llama.cpp).
DRY_BREAKERS = ("\n", ":", '"', "*")
DRY_MAX_MATCH = 64  # longer matches change nothing: the penalty is already enormous


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    max_tokens: int = 512
    seed: int = -1
    # Drop tokens less likely than min_p times the likeliest one (0 = off).
    min_p: float = 0.05
    # llama.cpp's repeat penalty: positive logits divided by it, negative ones multiplied,
    # for every token among the reply's last penalty_last_n (1 = off).
    repeat_penalty: float = 1.1
    # OpenAI-style: subtracted once per distinct recent token / once per occurrence.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    # DRY ("don't repeat yourself"): a token that would extend a repeat of n >= allowed_length
    # earlier tokens loses multiplier * base ** (n - allowed_length) (0 = off).
    dry_multiplier: float = 0.8
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_last_n: int = 1024

    @property
    def penalizes(self) -> bool:
        return (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or self.dry_multiplier > 0.0)

    def without_penalties(self) -> Sampling:
        return _replace(self, repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                        dry_multiplier=0.0, min_p=0.0)


def _replace(sampling: Sampling, **changes: float) -> Sampling:
    import dataclasses

    return dataclasses.replace(sampling, **changes)


# GGUF metadata keys (llama.cpp's general.sampling.*) a model file may carry to recommend
# its own sampling settings, and the Sampling field each one sets.
RECOMMENDED_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.penalty_last_n": "penalty_last_n",
}


def recommended_sampling(metadata: Mapping[str, str]) -> dict[str, float | int]:
    """The sampling settings a GGUF recommends for itself (most carry none)."""
    types = {f.name: f.type for f in fields(Sampling)}
    found: dict[str, float | int] = {}
    for key, name in RECOMMENDED_KEYS.items():
        raw = metadata.get(key)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        found[name] = int(value) if types[name] in (int, "int") else value
    return found


def sampling_from_settings(chat: object, recommended: Mapping[str, float | int] | None = None,
                           defaults: object | None = None) -> Sampling:
    """Sampling from the chat settings; where the user left a key at Floe's default and
    the model file recommends a value (and chat.model_defaults is on), the model's wins."""
    values = {f.name: getattr(chat, f.name) for f in fields(Sampling) if hasattr(chat, f.name)}
    if recommended and getattr(chat, "model_defaults", True):
        defaults = defaults if defaults is not None else type(chat)()
        for name, value in recommended.items():
            if name in values and values[name] == getattr(defaults, name, None):
                values[name] = value
    return Sampling(**values)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Normalized log-probabilities in float64 (float32 loses mass over a 50k vocabulary)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x)
    return shifted - np.log(np.exp(shifted).sum())


def dry_match_lengths(history: Sequence[int], is_breaker: Callable[[int], bool],
                      allowed_length: int) -> dict[int, int]:
    """For each token that would continue an earlier occurrence of the reply's latest
    tokens, the length of the longest such repeated run (only runs >= allowed_length).

    A run never crosses a breaker token, so repeated formatting does not count.
    """
    n = len(history)
    if n < max(allowed_length, 1) + 1 or is_breaker(history[-1]):
        return {}
    arr = np.asarray(history, dtype=np.int64)
    last = arr[-1]
    # Earlier positions holding the same token as the last one; the token after each is
    # what would repeat.
    ends = np.flatnonzero(arr[:-1] == last)
    lengths: dict[int, int] = {}
    for end in ends[::-1]:
        following = int(arr[end + 1])
        if is_breaker(following):
            continue
        length = 1
        while (length < DRY_MAX_MATCH and end - length >= 0
               and arr[end - length] == arr[n - 1 - length]
               and not is_breaker(int(arr[end - length]))):
            length += 1
        if length >= allowed_length and length > lengths.get(following, 0):
            lengths[following] = length
    return lengths


def penalize(logits: np.ndarray, generated: Sequence[int], sampling: Sampling,
             is_breaker: Callable[[int], bool] = lambda token: False) -> np.ndarray:
    """The logits (float64, a copy) with the reply's repetition penalties applied.

    `generated` is the reply so far (the prompt is not penalized: repeating the user's
    words in an answer is fine). Without a reply yet, or with every penalty off, the result
    equals the input.
    """
    x = np.array(logits, dtype=np.float64)
    if not generated or not sampling.penalizes:
        return x
    window = generated[-sampling.penalty_last_n:] if sampling.penalty_last_n > 0 else []
    if len(window):
        tokens, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
        if sampling.repeat_penalty != 1.0:
            values = x[tokens]
            x[tokens] = np.where(values > 0, values / sampling.repeat_penalty,
                                 values * sampling.repeat_penalty)
        if sampling.presence_penalty or sampling.frequency_penalty:
            x[tokens] -= sampling.presence_penalty + sampling.frequency_penalty * counts
    if sampling.dry_multiplier > 0:
        recent = generated[-sampling.dry_last_n:] if sampling.dry_last_n > 0 else generated
        for token, length in dry_match_lengths(recent, is_breaker,
                                               sampling.dry_allowed_length).items():
            x[token] -= sampling.dry_multiplier * sampling.dry_base ** (
                length - sampling.dry_allowed_length)
    return x


def sample_token(logprobs: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise top-k, min-p, top-p, then a draw at the
    temperature (min-p on the untempered distribution, as llama.cpp orders them)."""
    if sampling.temperature <= 0:
        return int(np.argmax(logprobs))
    candidates = np.arange(logprobs.shape[0])
    if 0 < sampling.top_k < logprobs.shape[0]:
        candidates = np.argpartition(logprobs, -sampling.top_k)[-sampling.top_k:]
    raw = logprobs[candidates]
    order = np.argsort(raw)[::-1]
    candidates, raw = candidates[order], raw[order]
    if sampling.min_p > 0:
        keep = max(1, int(np.count_nonzero(raw >= raw[0] + np.log(sampling.min_p))))
        candidates, raw = candidates[:keep], raw[:keep]
    scaled = raw / sampling.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    return int(rng.choice(candidates, p=probs))
