"""The real-time fused decoder: the SLM decodes, the cloud streams alongside, never blocking.

At each position the SLM's distribution is ready first. If the cloud's stream has reached
that point of the reply, its top-k is mapped onto the SLM vocabulary and fused, weighted
by its confidence (fusion.cloud_weight). Where they disagree, the router first asks whether
the reply draws on the user's private context (fusion.private_shift): if it does, the
cloud, which never saw that context, is left out of the rest of the reply. The reply waits
for the cloud only where the local model is unsure, never at the first token, and at most
`wait_budget_ms` in all.

When the reply leaves the cloud's text, a cloud that can continue a partial reply is asked
again from the new prefix, up to `max_requests` billed requests per reply; one that cannot
(OpenAI's chat API) is asked once, and the reply re-aligns to its answer where the reply's
last words turn up in it. A cloud failure trips a breaker: the rest of the reply is local,
with a notice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from floe_app.config import FusionSettings
from floe_app.engine.cloud import CANCELLED, OK, CloudClient, CloudStream, Recorder
from floe_app.engine.compute import own_team
from floe_app.engine.fusion import (
    LOOKAHEAD,
    Vocabulary,
    align,
    cloud_distribution,
    cloud_weight,
    fuse_log_linear,
    fuse_proxy_tuning,
    penalized,
    private_shift,
    realign,
)
from floe_app.engine.redact import Redactor, safe_prefix
from floe_app.engine.sampling import Sampling, sample_token

# What a failed request means for the reader of the notice.
FAILURE_TEXT = {
    "auth": "the cloud refused the API key",
    "rate_limited": "the cloud is rate-limiting requests",
    "server_error": "the cloud had a server error",
    "unsupported": "the cloud refused the request (wrong model name, or an option it does"
                   " not support: `floe cloud probe` checks)",
    "timeout": "the cloud timed out",
    "unreachable": "the cloud could not be reached",
    "broken_stream": "the cloud's stream broke off",
    "malformed": "the cloud sent data Floe cannot read",
    "not_sent": "the privacy ledger could not record the request, so nothing was sent",
}


@dataclass
class FusionStats:
    agreed: int = 0  # the cloud was there and backed the SLM's own first choice
    fused: int = 0  # the cloud was there and disagreed: fusion decided
    absent: int = 0  # no cloud distribution in time: the SLM's token alone
    overruled: int = 0  # fusion chose another token than the SLM's own first choice
    private: int = 0  # local alone: the reply draws on private context the cloud never saw
    private_from: int = -1  # the token from which it did (-1: it never did)
    private_shift: float = 0.0  # the largest KL (nats) the private context made, where checked
    requests: int = 0  # billed requests for this reply
    restarts: int = 0  # of which asked again after the reply left the cloud's text
    realigned: int = 0  # times the reply found its place in the cloud's answer again
    waited_ms: float = 0.0  # the reply's total pause for the cloud
    bytes_sent: int = 0
    bytes_received: int = 0
    breaker: str = ""
    method: str = ""  # the profile's one-line description
    fusion_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        total = max(1, self.agreed + self.fused + self.absent + self.private)
        return {
            "agreed": round(self.agreed / total, 3), "fused": round(self.fused / total, 3),
            "absent": round(self.absent / total, 3), "private": round(self.private / total, 3),
            "private_from": self.private_from, "private_shift": round(self.private_shift, 2),
            "overruled": round(self.overruled / total, 3), "requests": self.requests,
            "restarts": self.restarts, "realigned": self.realigned,
            "waited_ms": round(self.waited_ms, 1), "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received, "breaker": self.breaker,
            "method": self.method,
        }


def diverged(written: bytes, cloud_text: bytes) -> bool:
    n = min(len(written), len(cloud_text))
    return written[:n] != cloud_text[:n]


def beyond(written: bytes, cloud_text: bytes) -> bytes:
    """The cloud's text past what the reply wrote; b"" where the reply left it or is ahead."""
    return cloud_text[len(written):] if cloud_text.startswith(written) else b""


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# The reply's first tokens, whose private shift is checked at the first disagreement even
# where the cloud was absent or agreed: the opening says what kind of answer it is.
OPENING = 4

# Where the local model would rather end its turn than anything else, the reply ends.
END_SURE = 0.5


class PrivateCheck:
    """The local model's next-token log-probabilities after the reply's tokens so far, with
    and without the user's private context and adapter (two llama.cpp contexts)."""

    def __init__(self, with_private: Callable[[list[int]], np.ndarray],
                 without: Callable[[list[int]], np.ndarray], beside: bool = False) -> None:
        self.with_private = with_private
        self._without = without
        # The reply's threads leave a core free: read the public prompt beside its own.
        self.beside = beside
        self._seen: dict[tuple[int, ...], np.ndarray] = {}
        self._lock = threading.Lock()
        self._warmed = False

    def without(self, done: list[int]) -> np.ndarray:
        key = tuple(done)
        with self._lock:
            if key not in self._seen:
                if len(self._seen) > 2 * OPENING:
                    self._seen.clear()
                self._seen[key] = self._without(done)
            return self._seen[key]

    def warm(self) -> None:
        """Read the prompt without private context in the background (once), so a check
        at the first disagreement costs no prompt reading. `beside`: at once, in a thread
        team of its own on the free cores, while the local model reads its prompt. Else
        once the local model has read its own prompt: both contexts then evaluate on the
        one llama.cpp thread (compute.py), and the first token must not wait for the
        second prompt (measured with 1 of 2 cores for the reply, local 45 tokens/s: fused
        34.5 reading it after the first token, 42.8-45.5 beside it)."""
        if self._warmed:
            return
        self._warmed = True
        threading.Thread(target=self._read_prompt, daemon=True,
                         name="floe-public-prompt").start()

    def _read_prompt(self) -> None:
        if self.beside:
            with own_team():
                self.without([])
        else:
            self.without([])


class FusedChooser:
    """Chooses each token of one reply from the SLM fused with the cloud's stream."""

    def __init__(self, vocab: Vocabulary, client: CloudClient,
                 cloud_messages: list[dict[str, str]], redactor: Redactor,
                 settings: FusionSettings, sampling: Sampling, stats: FusionStats,
                 private: PrivateCheck | None = None,
                 recorder: Recorder | None = None,
                 tokenize: Callable[[str], list[int]] | None = None) -> None:
        self.vocab = vocab
        self.client = client
        self.recorder = recorder
        self.cloud_messages = cloud_messages
        self.redactor = redactor
        self.settings = settings
        self.sampling = sampling
        self.stats = stats
        self.private = private  # None: the local model has no private context or adapter
        self.source = "local"  # where the last chosen token came from (provenance.py)
        # The local distributions at the reply's first positions, until the private check
        # has looked at them (position, log-probabilities).
        self.opening: list[tuple[int, np.ndarray]] = []
        self.tokenize = tokenize  # the local tokenizer, to draft the cloud's text ahead
        self.notices: list[str] = []
        self.reply = b""
        self.tokens: list[int] = []
        self.streams: list[CloudStream] = []
        self.stream: CloudStream | None = None
        # The reply from byte `anchor[0]` on follows the cloud's text from byte `anchor[1]`;
        # None while the reply has left the cloud's text.
        self.anchor: tuple[int, int] | None = (0, 0)
        self.lost_at = 0  # where in the cloud's text the reply left it
        self.step_started: float | None = None
        self.cloud_ahead = b""  # the cloud's own text after the reply, at the last choice
        self._start_stream()

    def _next_prefix(self) -> tuple[str, int]:
        """What of the reply a new request would send (complete words only, redacted) and
        where in the reply it ends."""
        profile = self.client.known_profile
        if not self.reply or profile is None or not profile.can_continue:
            return "", 0
        clear = safe_prefix(self.reply.decode("utf-8", errors="ignore")).rstrip(" ")
        return self.redactor.redact(clear), len(clear.encode("utf-8"))

    def _can_ask_again(self, stream: CloudStream) -> bool:
        """Another request is worth it: the cloud can continue, the cap allows, and there
        is more of the reply to send than last time (else a greedy cloud says the same)."""
        profile = stream.profile
        return (profile is not None and profile.can_continue
                and self.stats.requests < self.settings.max_requests
                and self._next_prefix()[1] > self.origin)

    def _start_stream(self) -> None:
        prefix, origin = self._next_prefix()
        self.origin = origin  # where in the reply this request's continuation starts
        self.anchor = (origin, 0)
        self.stream = self.client.stream(
            self.cloud_messages, prefix, max_tokens=self.sampling.max_tokens,
            recorder=self.recorder, purpose=f"fused, request {self.stats.requests + 1} of at"
                                            f" most {self.settings.max_requests}")
        self.streams.append(self.stream)
        self.stats.requests += 1

    def _trip(self, reason: str) -> None:
        self.stats.breaker = reason
        self.notices.append(f"Cloud off for the rest of this reply: {reason}.")
        if self.stream is not None:
            self.stream.cancel()
        self.stream = None

    def _left_cloud_text(self, stream: CloudStream, written: bytes) -> None:
        """The reply just left the cloud's text: ask again if it can continue and the cap
        allows, else look for the reply's place in the text it has."""
        assert self.anchor is not None
        if self._can_ask_again(stream):
            self._ask_again(stream)
            return
        self.lost_at = self.anchor[1] + common_prefix(written[self.anchor[1]:],
                                                      stream.text[self.anchor[1]:])
        self.anchor = None

    def _ask_again(self, stream: CloudStream) -> None:
        stream.cancel()
        self.stats.restarts += 1
        self._start_stream()

    def _written(self, stream: CloudStream) -> bytes | None:
        """_as_cloud_text, after finding the reply's place in the cloud's text again if it
        had left it; None while it has left it (or just did)."""
        if self.anchor is None:
            at = realign(self.reply, stream.text, self.lost_at)
            if at is None:
                if self._can_ask_again(stream):  # the reply has grown by a word since
                    self._ask_again(stream)
                return None
            self.anchor = (len(self.reply), at)
            self.stats.realigned += 1
        written = self._as_cloud_text(stream)
        if diverged(written, stream.text):
            self._left_cloud_text(stream, written)
            return None
        return written

    def _as_cloud_text(self, stream: CloudStream) -> bytes:
        """The reply as the cloud's text would have it (while anchored): the cloud's own
        text up to the anchor, then the reply since."""
        assert self.anchor is not None
        reply_at, cloud_at = self.anchor
        return stream.text[:cloud_at] + self.reply[reply_at:]

    def _check_stream(self, stream: CloudStream) -> bool:
        """False (and the breaker tripped) if this stream cannot be fused."""
        profile = stream.profile
        if profile is not None and not self.stats.method:
            self.stats.method = profile.describe()
        if profile is not None and not profile.fusable:
            self._trip(f"this cloud streams no log-probabilities, so fused replies are local"
                       f" ({profile.describe().split(':')[0]}); cloud mode (F4) shows its"
                       " own text")
            return False
        if stream.lacks_logprobs:
            self.client.forget_profile()  # it claimed log-probabilities: probe it again
            self._trip("the cloud streamed text without log-probabilities, unlike what it"
                       " did when probed; it is probed again before the next reply")
            return False
        if stream.done and stream.outcome not in (OK, CANCELLED) and not stream.tokens:
            self._trip(FAILURE_TEXT.get(stream.outcome, stream.outcome)
                       + (f" ({stream.error})" if stream.error else ""))
            return False
        if stream.profile is not None and stream.first_token_at is None and not stream.done \
                and time.perf_counter() - stream.started_at > self.settings.first_token_ms / 1000:
            self._trip(f"it did not start answering within {self.settings.first_token_ms} ms")
            return False
        return True

    def _wait_s(self, logprobs: np.ndarray) -> float:
        """How long this token may wait for the cloud: only where the local model is
        unsure, never at the first token, within the per-token deadline and the reply's
        budget (time spent computing this step counts)."""
        if self.step_started is None or float(np.exp(logprobs.max())) >= self.settings.sure_prob:
            return 0.0
        if self.stream is None or self.stream.profile is None:
            return 0.0  # its request has not left yet (a first probe is running)
        elapsed = time.perf_counter() - self.step_started
        left = self.settings.wait_budget_ms - self.stats.waited_ms
        return max(0.0, min(self.settings.deadline_ms / 1000 - elapsed, left / 1000))

    def _cloud_candidates(self, logprobs: np.ndarray) -> list[tuple[bytes, float]] | None:
        stream = self.stream
        if stream is None or not self._check_stream(stream):
            return None
        written = self._written(stream)
        if written is None or stream is not self.stream:
            return None
        budget = self._wait_s(logprobs)
        if budget > 0 and len(stream.text) <= len(written) and not stream.done:
            started = time.perf_counter()
            stream.wait_until(lambda: len(stream.text) > len(written) or stream.finished,
                              budget)
            self.stats.waited_ms += (time.perf_counter() - started) * 1000
            if not self._check_stream(stream):
                return None
        self.cloud_ahead = beyond(written, stream.text)
        candidates = align(list(stream.tokens), written, stream.finished)
        if candidates is None and stream.done and stream.outcome not in (OK, CANCELLED):
            self._trip(FAILURE_TEXT.get(stream.outcome, stream.outcome)
                       + (f" ({stream.error})" if stream.error else ""))
        return candidates

    def _keep_to_cloud(self, fused: np.ndarray, token: int) -> int:
        """The cloud's own next token instead of the fused choice, where the two nearly tie
        (fusion.keep_to_cloud_nats). The cloud's text follows its sampler's penalties, its
        numbers do not, and Floe's penalties differ from its sampler's: near ties are where
        they part, and leaving the cloud's text costs a new request and every token it
        had written ahead. A step, not the distribution: sampling is left as it is."""
        margin = self.settings.keep_to_cloud_nats
        ahead = self.cloud_ahead[:LOOKAHEAD]
        if margin <= 0 or not ahead:
            return token
        own = self.vocab.prefixes(ahead)  # local tokens that write nothing past its text
        if own.size == 0:
            return token
        best = int(own[np.argmax(fused[own])])
        return best if fused[best] >= fused[token] - margin else token

    def _cloud_choice(self, cloud: np.ndarray, candidates: list[tuple[bytes, float]]
                      ) -> np.ndarray:
        """The local tokens consistent with the cloud's likeliest candidate, with the
        penalties (the mass its local tokens carry in `cloud`)."""
        probs = np.exp(cloud)
        supports = [self.vocab.supporting(text) for text, _ in candidates]
        return max(supports, key=lambda ids: float(probs[ids].sum()))

    def _draws_on_private(self, logprobs: np.ndarray, public: np.ndarray) -> bool:
        """Whether the reply draws on the private context: it moves the local distribution
        by private_kl nats or more (fusion.private_shift) here, at the local model's next
        token, or at any of the reply's opening tokens not checked yet.

        Checked at disagreements only (agreement needs no router). In the opening, the
        opening's earlier tokens and the next one count too, because the cloud often
        disagrees first where the private context does not show: a personal answer's first
        word is a plain one ("The") and the next gives it away ("user's"), or its first word
        was the fact ("Biscotti") written before the cloud's stream arrived. Later, the
        position itself tells (the local model is about to write the private fact there).
        """
        assert self.private is not None
        limit = self.settings.private_kl
        shift = private_shift(logprobs, public)
        while shift < limit and self.opening:
            at, local = self.opening.pop()
            if at < len(self.tokens):  # (this position is the one just measured)
                shift = max(shift, private_shift(local, self.private.without(self.tokens[:at])))
        top = int(np.argmax(logprobs))
        if shift < limit and len(self.tokens) < OPENING and top not in self.vocab.end_ids:
            ahead = [*self.tokens, top]
            shift = max(shift, private_shift(self.private.with_private(ahead),
                                             self.private.without(ahead)))
        self.stats.private_shift = max(self.stats.private_shift, shift)
        return shift >= limit

    def _leave_cloud_out(self) -> None:
        """The rest of this reply is the local model's: the cloud's view of it is uninformed,
        so its stream is stopped and no more requests are billed."""
        self.stats.private_from = len(self.tokens)
        for stream in self.streams:
            stream.cancel()
        self.stream = None

    def choose(self, logprobs: np.ndarray, rng: np.random.Generator,
               penalty: np.ndarray | None = None) -> int:
        self.source = "local"
        if self.private is not None:
            self.private.warm()
        if self.stats.private_from >= 0:
            self.stats.private += 1
            self.source = "private"
            return sample_token(logprobs, self.sampling, rng)
        if self.private is not None and len(self.tokens) < OPENING:
            self.opening.append((len(self.tokens), logprobs))
        local_top = int(np.argmax(logprobs))
        if local_top in self.vocab.end_ids and float(np.exp(logprobs[local_top])) >= END_SURE:
            # The local model knows where its turn ends; a cloud's end is not always there
            # (a base model behind a raw prompt writes the transcript on: "User: ...").
            self.stats.absent += 1
            return sample_token(logprobs, self.sampling, rng)
        candidates = self._cloud_candidates(logprobs)
        if not candidates:
            self.stats.absent += 1
            return sample_token(logprobs, self.sampling, rng)
        started = time.perf_counter()
        probs = np.exp(logprobs)
        cloud = penalized(cloud_distribution(self.vocab, logprobs, candidates, probs), penalty)
        agrees = local_top in self._cloud_choice(cloud, candidates)
        # Only a disagreement needs the private check (more local evaluations).
        public = None if agrees or self.private is None else self.private.without(self.tokens)
        if public is not None and self._draws_on_private(logprobs, public):
            self._leave_cloud_out()
            self.stats.private += 1
            self.source = "private"
            return sample_token(logprobs, self.sampling, rng)
        if self.settings.form == "proxy":
            # Without private context or an adapter the SLM is its own base: the cloud alone.
            if self.private is not None and public is None:
                public = self.private.without(self.tokens)
            tuned = logprobs if penalty is None else logprobs - penalty  # the cloud has it
            fused = fuse_proxy_tuning(cloud, tuned, tuned if public is None else public,
                                      self.settings.beta)
        else:
            confidence = float(np.exp(max(lp for _, lp in candidates)))
            weight = cloud_weight(confidence, self.settings.lambda_min,
                                  self.settings.lambda_max)
            fused = fuse_log_linear(logprobs, cloud, weight)
        self.stats.fusion_ms.append((time.perf_counter() - started) * 1000)
        if agrees:
            self.stats.agreed += 1
        else:
            self.stats.fused += 1
        token = sample_token(fused, self.sampling, rng)
        if self.sampling.temperature <= 0:
            token = self._keep_to_cloud(fused, token)
        if token != local_top:
            self.stats.overruled += 1
            self.source = "overruled"
        elif agrees:
            self.source = "agreed"
        return token

    def draft(self, limit: int) -> list[int]:
        """The cloud's text ahead of the reply as local tokens, to be scored in one batch
        and accepted while the fused choice agrees (speculative decoding with the cloud
        as the drafter). Whole tokens only: the last one may still be growing."""
        stream = self.stream
        limit = min(limit, self.settings.batch_tokens)
        if self.tokenize is None or stream is None or stream.profile is None or \
                self.anchor is None or limit < 2:
            return []
        ahead = beyond(self._as_cloud_text(stream), stream.text)
        if len(ahead) < 2:
            return []
        try:
            text = ahead.decode("utf-8")
        except UnicodeDecodeError as exc:  # ends (or starts) inside a character
            text = ahead[:exc.start].decode("utf-8")
        if not text:
            return []
        return self.tokenize(text)[:-1][:limit]

    def accept(self, token: int, piece: bytes) -> None:
        self.tokens.append(token)
        self.reply += piece
        self.step_started = time.perf_counter()

    def close(self, settle_s: float = 1.0) -> None:
        """Cancel what is still streaming and add up the bytes every request moved."""
        for stream in self.streams:
            stream.cancel()
        for stream in self.streams:
            if stream.entry is None:
                continue  # never sent (a probe was running): it will not be
            stream.wait_until(lambda s=stream: s.done, settle_s)
            if stream.entry is not None:
                self.stats.bytes_sent += stream.entry.bytes_sent
                self.stats.bytes_received += stream.entry.bytes_received
        if not self.stats.method and self.streams and self.streams[0].profile is not None:
            self.stats.method = self.streams[0].profile.describe()
