"""Between the interfaces and the engine: a chat turn from the user's words to a stored reply.

The TUI and the CLI both drive `ChatSession.reply`, which stores the user's message first
(nothing typed is ever lost), fits the conversation into the model's context window, and
writes the reply to the database while it streams.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floe_app.config import Config
from floe_app.engine.local import GenerationStats, LocalEngine, ProgressCallback, resolve_model_path
from floe_app.engine.sampling import Sampling
from floe_app.errors import FloeError
from floe_app.store import Conversation, Message, Store

# How often a streaming reply is saved: what a crash can lose at most.
FLUSH_INTERVAL_S = 0.2
DEFAULT_TITLE = "New chat"
CLIP_MARKER = "\n\n[… {chars:,} characters left out to fit the context window …]\n\n"


@dataclass
class Saved:
    """The user's message is in the database: from here on nothing they typed can be lost."""

    message_id: int


@dataclass
class Notice:
    """Something the user should see about this reply (clipping, interruption)."""

    text: str


@dataclass
class Delta:
    """New reply text, in order."""

    text: str


@dataclass
class Finished:
    message_id: int
    text: str
    status: str
    stats: dict[str, Any] = field(default_factory=dict)


ReplyEvent = Saved | Notice | Delta | Finished


def title_from(text: str, limit: int = 48) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), DEFAULT_TITLE)
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def fit_prompt(engine: LocalEngine, system: list[dict[str, str]],
               history: list[dict[str, str]], user: dict[str, str],
               budget: int) -> tuple[list[int], list[str]]:
    """Tokens of the prompt within `budget`: drop the oldest turns, then clip the message.

    A message too long on its own keeps its beginning and its end (a pasted document's
    question is usually at one of them), with a marker saying how much was left out.
    """
    notices: list[str] = []
    kept = list(history)
    tokens = engine.chat_tokens([*system, *kept, user])
    while len(tokens) > budget and kept:
        kept = kept[1:]
        tokens = engine.chat_tokens([*system, *kept, user])
    if len(kept) < len(history):
        notices.append(f"{len(history) - len(kept)} earlier messages were left out of the"
                       f" model's view to fit its {engine.n_ctx:,}-token context window.")
    if len(tokens) <= budget:
        return tokens, notices
    content = user["content"]
    body = engine.tokenize(content, special=False)
    overhead = len(tokens) - len(body)
    room = budget - overhead - len(engine.tokenize(CLIP_MARKER.format(chars=len(content)),
                                                   special=False))
    while room > 0:
        head_n = room * 2 // 3
        head = engine.detokenize(body[:head_n])
        tail = engine.detokenize(body[len(body) - (room - head_n):]) if room > head_n else ""
        left_out = len(content) - len(head) - len(tail)
        clipped = {"role": user["role"],
                   "content": head + CLIP_MARKER.format(chars=left_out) + tail}
        tokens = engine.chat_tokens([*system, clipped])
        if len(tokens) <= budget:
            notices.append(
                f"Your message ({len(content):,} characters, {len(body):,} tokens) is longer"
                f" than the model's {engine.n_ctx:,}-token context window: it sees the"
                f" beginning and the end, {left_out:,} characters in the middle are left out."
                " The full text is saved.")
            return tokens, notices
        room -= max(8, (len(tokens) - budget) * 2)  # token boundaries shift when re-split
    raise FloeError(f"the system prompt alone does not fit the {engine.n_ctx}-token context"
                    " window; shorten chat.system_prompt or raise model.context_tokens")


class ChatSession:
    """One user's chat state: the store, the settings and the (lazily loaded) local model."""

    def __init__(self, store: Store, config: Config, model_override: str | None = None) -> None:
        self.store = store
        self.config = config
        self.model_override = model_override
        self._engine: LocalEngine | None = None
        self._engine_key: tuple[Any, ...] | None = None
        self._engine_lock = threading.Lock()

    # The model

    @property
    def model_path(self) -> Path:
        return resolve_model_path(self.model_override or self.config.model.path)

    def _wanted_engine_key(self) -> tuple[Any, ...]:
        m = self.config.model
        return (str(self.model_path), m.threads, m.context_tokens)

    def engine(self, progress: ProgressCallback | None = None) -> LocalEngine:
        """The loaded model, (re)loading it if the settings changed. Raises ModelError."""
        with self._engine_lock:
            key = self._wanted_engine_key()
            if self._engine is None or self._engine_key != key:
                if self._engine is not None:
                    self._engine.close()
                    self._engine = None
                self._engine = LocalEngine.load(
                    self.model_path, threads=self.config.model.threads,
                    context_tokens=self.config.model.context_tokens, progress=progress,
                )
                self._engine_key = key
            return self._engine

    @property
    def loaded_engine(self) -> LocalEngine | None:
        return self._engine

    def sampling(self) -> Sampling:
        c = self.config.chat
        return Sampling(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                        max_tokens=c.max_tokens, seed=c.seed)

    # Conversations

    def new_conversation(self) -> int:
        return self.store.create_conversation(DEFAULT_TITLE)

    def reply(self, conversation_id: int, text: str,
              cancel: threading.Event | None = None) -> Iterator[ReplyEvent]:
        """Store the user's message, then stream and store the model's reply."""
        if not text.strip():
            raise FloeError("the message is empty: type something to send")
        conversation = self.store.conversation(conversation_id)
        if conversation is None:
            raise FloeError(f"no conversation with id {conversation_id}")
        history = self.store.messages(conversation_id)
        yield Saved(self.store.add_message(conversation_id, "user", text))
        if conversation.title == DEFAULT_TITLE and not history:
            self.store.rename_conversation(conversation_id, title_from(text))
        engine = self.engine()
        sampling = self.sampling()
        system = [{"role": "system", "content": self.config.chat.system_prompt}]
        past = [{"role": m.role, "content": m.content} for m in history
                if m.role in ("user", "assistant") and m.content]
        reserve = min(sampling.max_tokens, engine.n_ctx // 2)
        tokens, notices = fit_prompt(engine, system, past, {"role": "user", "content": text},
                                     engine.n_ctx - reserve)
        for notice in notices:
            yield Notice(notice)
        yield from self._stream_reply(conversation_id, engine, tokens, sampling, cancel,
                                      clipped=bool(notices))

    def _stream_reply(self, conversation_id: int, engine: LocalEngine, tokens: list[int],
                      sampling: Sampling, cancel: threading.Event | None,
                      clipped: bool) -> Iterator[ReplyEvent]:
        reply_id = self.store.add_message(conversation_id, "assistant", "", status="streaming",
                                          model=engine.name, mode="local")
        parts: list[str] = []
        stats = GenerationStats()
        last_flush = time.monotonic()
        status = "error"
        try:
            for step in engine.generate(tokens, sampling, cancel, stats):
                if not step.text:
                    continue
                parts.append(step.text)
                yield Delta(step.text)
                if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                    self.store.update_message(reply_id, content="".join(parts))
                    last_flush = time.monotonic()
            status = "stopped" if stats.finish_reason == "cancelled" else "complete"
        except GeneratorExit:
            status = "stopped"
            raise
        finally:
            summary = reply_stats(stats, mode="local", clipped=clipped)
            self.store.update_message(reply_id, content="".join(parts), status=status,
                                      stats=summary)
        yield Finished(reply_id, "".join(parts), status, summary)


def reply_stats(stats: GenerationStats, *, mode: str, clipped: bool) -> dict[str, Any]:
    return {
        "mode": mode,
        "ttft_ms": round(stats.ttft_ms, 1),
        "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens_per_s, 1),
        "p95_gap_ms": round(percentile(stats.gaps_ms, 95), 1),
        "prompt_tokens": stats.prompt_tokens,
        "finish_reason": stats.finish_reason,
        "clipped": clipped,
    }


def conversation_markdown(conversation: Conversation, messages: list[Message]) -> str:
    """A conversation as a Markdown document, for export and `floe history show`."""
    lines = [f"# {conversation.title}", "", f"_Started {conversation.created_at}_", ""]
    for message in messages:
        who = {"user": "You", "assistant": "Floe"}.get(message.role, message.role.title())
        note = "" if message.status == "complete" else f" _({message.status})_"
        lines += [f"## {who}{note}", "", message.content or "_(no text)_", ""]
    return "\n".join(lines)
