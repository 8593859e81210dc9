"""Logit-level fusion of a black-box cloud LLM with the on-device SLM. Pure functions.

The cloud is seen only through what an OpenAI-compatible API returns: the text of each
token it generated and the top-k alternatives with log-probabilities, from its own
tokenizer. Everything here works on bytes, so that byte-level SLM tokens (a piece of a
UTF-8 character) and multi-character cloud tokens meet on common ground.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

import numpy as np

# A candidate meaning "the cloud ended its reply here"; supports the SLM's end tokens.
END = b"\x00<end>"
# The least probability left outside the cloud's top-k, so that no SLM token gets zero.
MIN_REST = 1e-9
# Bytes of the cloud's own continuation its chosen candidate carries (longer than any
# local token, so none can run past it unnoticed).
LOOKAHEAD = 32


@dataclass(frozen=True)
class CloudToken:
    """One token of the cloud's continuation: where it starts, its text, its alternatives."""

    offset: int
    text: bytes
    top: tuple[tuple[bytes, float], ...]


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with `prefix`."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


@dataclass
class Vocabulary:
    """The SLM's tokens as bytes, indexed to find those consistent with a text quickly."""

    pieces: list[bytes]
    end_ids: np.ndarray
    by_piece: dict[bytes, list[int]] = field(init=False)
    sorted_pieces: list[bytes] = field(init=False)
    sorted_ids: np.ndarray = field(init=False)
    _support_cache: dict[bytes, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.by_piece = {}
        for token, piece in enumerate(self.pieces):
            if piece:  # special tokens render as nothing: text cannot support them
                self.by_piece.setdefault(piece, []).append(token)
        order = sorted((p, t) for t, p in enumerate(self.pieces) if p)
        self.sorted_pieces = [p for p, _ in order]
        self.sorted_ids = np.array([t for _, t in order], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pieces)

    def supporting(self, candidate: bytes) -> np.ndarray:
        """SLM tokens consistent with the candidate (cached: cloud tokens recur)."""
        cached = self._support_cache.get(candidate)
        if cached is None:
            cached = self._supporting(candidate)
            if len(self._support_cache) > 50_000:
                self._support_cache.clear()
            self._support_cache[candidate] = cached
        return cached

    def prefixes(self, text: bytes) -> np.ndarray:
        """SLM tokens whose text is a prefix of `text` (or all of it): those that write
        nothing but what `text` says."""
        return np.array([t for k in range(1, len(text) + 1)
                         for t in self.by_piece.get(text[:k], ())], dtype=np.int64)

    def _supporting(self, candidate: bytes) -> np.ndarray:
        """SLM tokens whose text is consistent with the candidate: a prefix of it, or it
        and more (the SLM token then runs past what the cloud has said)."""
        if candidate == END:
            return self.end_ids
        if not candidate:
            return np.empty(0, dtype=np.int64)
        shorter = self.prefixes(candidate[:-1])  # the candidate itself is among `extending`
        lo = bisect.bisect_left(self.sorted_pieces, candidate)
        upper = _successor(candidate)
        hi = (len(self.sorted_pieces) if upper is None
              else bisect.bisect_left(self.sorted_pieces, upper, lo))
        extending = self.sorted_ids[lo:hi]
        return np.concatenate([shorter, extending]) if shorter.size else extending


def align(tokens: list[CloudToken], written: bytes, finished: bool
          ) -> list[tuple[bytes, float]] | None:
    """The cloud's candidates for what follows `written` (the reply since the stream began).

    None when the cloud has not yet reached that point or has left it. Inside a cloud token,
    the alternatives still consistent with what was written give the rest of that token.
    """
    position = len(written)
    end = tokens[-1].offset + len(tokens[-1].text) if tokens else 0
    if finished and position == end:
        return [(END, 0.0)]
    index = bisect.bisect_right([t.offset for t in tokens], position) - 1
    if index < 0:
        return None
    token = tokens[index]
    if position >= token.offset + max(len(token.text), 1):
        return None
    done = written[token.offset:]
    # What the cloud wrote after its own token: its candidate is that whole text, so only
    # local tokens that fit it back it ("s" and "s an", not "sc" for "As an AI"; a short
    # rest would otherwise lend the cloud's confidence to any token that starts with it).
    following = b""
    for later in tokens[index + 1:]:
        if len(following) >= LOOKAHEAD:
            break
        following += later.text
    consistent = [(c[len(done):] + (following[:LOOKAHEAD] if c == token.text else b""), lp)
                  for c, lp in token.top if c.startswith(done) and len(c) > len(done)]
    if not consistent or not done:
        return consistent or None
    total = np.logaddexp.reduce([lp for _, lp in consistent])
    return [(rest, lp - total) for rest, lp in consistent]


def cloud_distribution(vocab: Vocabulary, slm_logprobs: np.ndarray,
                       candidates: list[tuple[bytes, float]],
                       slm_probs: np.ndarray | None = None) -> np.ndarray:
    """The cloud's top-k spread over the SLM vocabulary, as log-probabilities.

    Each candidate's mass goes to the SLM tokens consistent with it, shared in proportion
    to the SLM's own probabilities (the SLM decides how to split text into its tokens);
    the mass outside the top-k, and that of candidates the SLM cannot write, is spread in
    proportion to the SLM's distribution, so no token gets zero.
    """
    p = np.exp(slm_logprobs) if slm_probs is None else slm_probs
    supports = []
    masses = []
    for text, logprob in candidates:
        ids = vocab.supporting(text)
        if ids.size:
            supports.append(ids)
            masses.append(float(np.exp(logprob)))
    covered = sum(masses)
    scale = min(1.0, (1.0 - MIN_REST) / covered) if covered > 0 else 0.0
    q = p * max(0.0, 1.0 - covered * scale)
    for ids, mass in zip(supports, masses, strict=True):
        weights = p[ids]
        total = weights.sum()
        if total > 0:
            q[ids] += weights * (mass * scale / total)  # ids are unique within a support
        else:  # the SLM gives these tokens no mass at all: spread it like the rest
            q += p * (mass * scale)
    return np.log(q)  # sums to 1 by construction: the rest plus each candidate's share


def entropy(logprobs: np.ndarray, probs: np.ndarray | None = None) -> float:
    p = np.exp(logprobs) if probs is None else probs
    return float(-(p * logprobs).sum())  # not np.dot: BLAS threads fight the decoder for cores


def private_shift(local_logprobs: np.ndarray, public_logprobs: np.ndarray) -> float:
    """KL(local || public) in nats: how far the user's private context and adapter move the
    local model's next-token distribution (0 where they change nothing).

    The router's privacy signal, for the whole reply rather than one token (fused.py leaves
    the cloud out of a reply once it passes fusion.private_kl). Measured on the fusion
    benchmark (SmolLM2-135M, 12 memory notes): one word into a reply, every answer to a
    personal question had moved 3.0-9.1 nats ("The user's dog is named"), every general
    answer at most 1.5. A per-token version (how much likelier the notes made this one
    token) misfired on general questions: notes naming Lisbon made "isa" likelier after the
    cloud's "L" of "Leonardo", and handed "Who painted the Mona Lisa?" to the small model.
    """
    p = np.exp(local_logprobs)
    with np.errstate(invalid="ignore"):  # tokens a penalty ruled out (-inf) weigh nothing
        terms = np.where(p > 0, p * (local_logprobs - public_logprobs), 0.0)
    return max(0.0, float(terms.sum()))


def cloud_weight(cloud_confidence: float, lambda_min: float, lambda_max: float) -> float:
    """λ at a position the cloud has reached, in a reply that does not draw on private
    context: from lambda_min to lambda_max with the cloud's confidence (its top candidate's
    probability).

    Neither the local model's entropy nor its confidence lowers it: measured with a cloud
    ten times its size, a small model is often sure of wrong facts ("The square root of 144
    is 28"), and every weight it kept against the cloud cost general accuracy (benchmark,
    re-aligned chat: 93% at 0.3-0.9 and 0.5-0.95, 97% at 0.6-1.0 to 0.9-1.0, 100% at 1-1;
    a cloud only 60% sure of "Mercury is..." lost its first word to the local "The", and a
    cloud that cannot continue is lost with it). So both default to 1: the local model
    writes where the cloud has not arrived, where the reply is private, and where its turn
    ends; lower lambda_min for a cloud no stronger than the local model.
    """
    return lambda_min + (lambda_max - lambda_min) * min(1.0, max(0.0, cloud_confidence))


def realign(reply: bytes, cloud: bytes, start: int, window: int = 512,
            min_tail: int = 8) -> int | None:
    """Where the reply's last words end in the cloud's text, searched from `start` (a little
    before, as the reply may have lagged) over `window` bytes; None if they are not there.

    The tail is the reply's last three words (more if shorter than `min_tail` bytes), taken
    from a word boundary, so a match never starts inside a cloud word.
    """
    starts = [m.start() for m in re.finditer(rb"\S+", reply)]
    if not starts:
        return None
    begin = starts[max(0, len(starts) - 3)]
    for earlier in reversed(starts[:max(0, len(starts) - 3)]):
        if len(reply) - begin >= min_tail:
            break
        begin = earlier
    tail = reply[begin:]
    if len(tail) < min_tail:
        return None
    lo = max(0, start - 64)
    hi = min(len(cloud), start + window)
    found = cloud.find(tail, lo, hi)
    while found >= 0:
        if found == 0 or not cloud[found - 1:found].isalnum():
            return found + len(tail)
        found = cloud.find(tail, found + 1, hi)
    return None


def _normalize(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def penalized(cloud_logprobs: np.ndarray, penalty: np.ndarray | None) -> np.ndarray:
    """The cloud's distribution with Floe's repetition penalties (`penalty`: what they
    added to each local token's logit), as the local one has them.

    A cloud's log-probabilities are its model's, before its own sampler's penalties: its
    text follows the penalties, its numbers do not. Fused as they come, a cloud that decides
    (λ = 1) would undo Floe's penalties, and its top choice would differ from the text it
    actually wrote, so the reply would leave that text (a new request, and no batches).
    """
    return cloud_logprobs if penalty is None else _normalize(cloud_logprobs + penalty)


def fuse_log_linear(slm_logprobs: np.ndarray, cloud_logprobs: np.ndarray,
                    weight: float) -> np.ndarray:
    """log p = (1 - λ)·log p_slm + λ·log q_cloud, renormalized."""
    mixed = (1.0 - weight) * slm_logprobs + weight * cloud_logprobs
    # A mix of log-probabilities: every entry <= 0 and the largest >= -log(vocabulary
    # size), so exp() neither overflows nor loses the mass; no max shift needed.
    return mixed - np.log(np.exp(mixed).sum())


def fuse_proxy_tuning(cloud_logprobs: np.ndarray, tuned_logprobs: np.ndarray,
                      base_logprobs: np.ndarray, beta: float) -> np.ndarray:
    """log q_cloud + β·(log p_tuned - log p_base): the cloud, steered by what the user's own
    adaptation (adapter or private context) changes in the SLM."""
    return _normalize(cloud_logprobs + beta * (tuned_logprobs - base_logprobs))
