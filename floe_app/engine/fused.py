"""The real-time fused decoder: the SLM decodes, the cloud streams alongside, never blocking.

At each position the SLM's distribution is ready first. If the cloud's stream has reached
that point of the reply, its top-k is mapped onto the SLM vocabulary and fused; if it has
not within the per-token deadline, the SLM's token goes alone. When the reply leaves the
cloud's continuation, that stream is cancelled and a new one asked for from the new prefix,
in the background. Repeated misses or a cloud failure trip a breaker: the rest of the
reply is local, with a notice. The first token never waits for the cloud.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from floe_app.config import FusionSettings
from floe_app.engine.cloud import CANCELLED, OK, CloudClient, CloudStream, Recorder
from floe_app.engine.fusion import (
    Vocabulary,
    align,
    cloud_distribution,
    cloud_weight,
    fuse_log_linear,
    fuse_proxy_tuning,
)
from floe_app.engine.redact import Redactor, safe_prefix
from floe_app.engine.sampling import Sampling, sample_token

# What a failed request means for the reader of the notice.
FAILURE_TEXT = {
    "auth": "the cloud refused the API key",
    "rate_limited": "the cloud is rate-limiting requests",
    "server_error": "the cloud had a server error",
    "unsupported": "the cloud endpoint does not support streamed log-probabilities",
    "timeout": "the cloud timed out",
    "unreachable": "the cloud could not be reached",
    "broken_stream": "the cloud's stream broke off",
    "not_sent": "the privacy ledger could not record the request, so nothing was sent",
}


@dataclass
class FusionStats:
    agreed: int = 0  # the cloud was there and backed the SLM's own first choice
    fused: int = 0  # the cloud was there and disagreed: fusion decided
    absent: int = 0  # no cloud distribution in time: the SLM's token alone
    requests: int = 0
    restarts: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    breaker: str = ""
    fusion_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        total = max(1, self.agreed + self.fused + self.absent)
        return {
            "agreed": round(self.agreed / total, 3), "fused": round(self.fused / total, 3),
            "absent": round(self.absent / total, 3), "requests": self.requests,
            "restarts": self.restarts, "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received, "breaker": self.breaker,
        }


def diverged(written: bytes, cloud_text: bytes) -> bool:
    n = min(len(written), len(cloud_text))
    return written[:n] != cloud_text[:n]


class FusedChooser:
    """Chooses each token of one reply from the SLM fused with the cloud's stream."""

    def __init__(self, vocab: Vocabulary, client: CloudClient,
                 cloud_messages: list[dict[str, str]], redactor: Redactor,
                 settings: FusionSettings, sampling: Sampling, stats: FusionStats,
                 base_logprobs: Callable[[list[int]], np.ndarray] | None = None,
                 recorder: Recorder | None = None) -> None:
        self.vocab = vocab
        self.client = client
        self.recorder = recorder
        self.cloud_messages = cloud_messages
        self.redactor = redactor
        self.settings = settings
        self.sampling = sampling
        self.stats = stats
        self.base_logprobs = base_logprobs  # the SLM without the user's adaptation (proxy)
        self.notices: list[str] = []
        self.reply = b""
        self.tokens: list[int] = []
        self.streams: list[CloudStream] = []
        self.stream: CloudStream | None = None
        self.origin = 0  # where in the reply the current stream's continuation starts
        self.misses = 0
        self.step_started: float | None = None
        self._start_stream()

    def _start_stream(self) -> None:
        clear = safe_prefix(self.reply.decode("utf-8", errors="ignore")).rstrip(" ")
        self.origin = len(clear.encode("utf-8"))
        self.stream = self.client.stream(self.cloud_messages, self.redactor.redact(clear),
                                         max_tokens=self.sampling.max_tokens,
                                         recorder=self.recorder)
        self.streams.append(self.stream)
        self.stats.requests += 1

    def _trip(self, reason: str) -> None:
        self.stats.breaker = reason
        self.notices.append(f"Cloud off for the rest of this reply: {reason}.")
        if self.stream is not None:
            self.stream.cancel()
        self.stream = None

    def _cloud_candidates(self) -> list[tuple[bytes, float]] | None:
        stream = self.stream
        if stream is None:
            return None
        written = self.reply[self.origin:]
        if diverged(written, stream.text):
            if self.stats.restarts >= self.settings.max_restarts:
                self._trip(f"the reply left the cloud's path {self.stats.restarts} times")
                return None
            stream.cancel()
            self.stats.restarts += 1
            self._start_stream()
            return None
        if self.step_started is not None:  # never for the first token
            budget = self.settings.deadline_ms / 1000 - (time.perf_counter()
                                                         - self.step_started)
            stream.wait_until(lambda: len(stream.text) > len(written) or stream.finished, budget)
        candidates = align(list(stream.tokens), written, stream.finished)
        if candidates is None and stream.done and stream.outcome not in (OK, CANCELLED):
            self._trip(FAILURE_TEXT.get(stream.outcome, stream.outcome)
                       + (f" ({stream.error})" if stream.error else ""))
        return candidates

    def _count_miss(self) -> None:
        """Misses before the cloud's first token are its round trip, not a fault."""
        stream = self.stream
        if stream is None:
            return
        if stream.tokens:
            self.misses += 1
            if self.misses >= self.settings.max_misses:
                self._trip(f"it missed {self.misses} tokens in a row")
        elif time.perf_counter() - stream.started_at > self.settings.first_token_ms / 1000:
            self._trip(f"it did not start answering within {self.settings.first_token_ms} ms")

    def choose(self, logprobs: np.ndarray, rng: np.random.Generator) -> int:
        candidates = self._cloud_candidates()
        if not candidates:
            self.stats.absent += 1
            self._count_miss()
            return sample_token(logprobs, self.sampling, rng)
        self.misses = 0
        started = time.perf_counter()
        probs = np.exp(logprobs)
        cloud = cloud_distribution(self.vocab, logprobs, candidates, probs)
        if self.settings.form == "proxy":
            # Without private context or an adapter the SLM is its own base: the cloud alone.
            base = self.base_logprobs(self.tokens) if self.base_logprobs else logprobs
            fused = fuse_proxy_tuning(cloud, logprobs, base, self.settings.beta)
        else:
            confidence = float(np.exp(max(lp for _, lp in candidates)))
            weight = cloud_weight(logprobs, self.settings.lambda_min, self.settings.lambda_max,
                                  probs, min(1.0, confidence))
            fused = fuse_log_linear(logprobs, cloud, weight)
        self.stats.fusion_ms.append((time.perf_counter() - started) * 1000)
        best = max(candidates, key=lambda c: c[1])[0]
        if np.any(self.vocab.supporting(best) == int(np.argmax(logprobs))):
            self.stats.agreed += 1
        else:
            self.stats.fused += 1
        return sample_token(fused, self.sampling, rng)

    def accept(self, token: int, piece: bytes) -> None:
        self.tokens.append(token)
        self.reply += piece
        self.step_started = time.perf_counter()

    def close(self, settle_s: float = 1.0) -> None:
        """Cancel what is still streaming and add up the bytes every request moved."""
        for stream in self.streams:
            stream.cancel()
        for stream in self.streams:
            stream.wait_until(lambda s=stream: s.done, settle_s)
            if stream.entry is not None:
                self.stats.bytes_sent += stream.entry.bytes_sent
                self.stats.bytes_received += stream.entry.bytes_received
