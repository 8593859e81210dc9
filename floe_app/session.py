"""Between the interfaces and the engine: a chat turn from the user's words to a stored reply.

The TUI and the CLI both drive `ChatSession.reply`, which stores the user's message first
(nothing typed is ever lost), fits the conversation into the model's context window, and
writes the reply to the database while it streams.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from floe_app.config import Config, FederationSettings, write_config
from floe_app.engine.cloud import (
    CANCELLED,
    OK,
    CloudClient,
    CloudTarget,
    CloudUnavailable,
    LedgerEntry,
    Recorder,
)
from floe_app.engine.fused import FAILURE_TEXT, FusedChooser, FusionStats, PrivateCheck
from floe_app.engine.hardware import cpu_info
from floe_app.engine.local import GenerationStats, LocalEngine, ProgressCallback, resolve_model_path
from floe_app.engine.probe import probe
from floe_app.engine.profiles import CloudProfile, ProfileCache
from floe_app.engine.provenance import Spans, extend, legend, render, shares
from floe_app.engine.redact import Redactor, Restorer, private_terms
from floe_app.engine.sampling import Sampling, sampling_from_settings
from floe_app.errors import FloeError, ModelError
from floe_app.paths import Paths
from floe_app.personalize.learning import Learning
from floe_app.personalize.registry import Registry
from floe_app.personalize.status import replying
from floe_app.plugins import Command, Plugins
from floe_app.store import Conversation, Message, Store
from floe_app.store.db import AdapterRow, SharedAdapter

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


@dataclass
class SettingsApplied:
    """What applying new settings did: notices and errors to show, and whether the model
    settings changed (the interface reloads the model, showing progress)."""

    reload_model: bool = False
    notices: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class FittedPrompt:
    messages: list[dict[str, str]]  # what the model sees (the cloud gets the same, redacted)
    tokens: list[int]
    notices: list[str]


def fit_prompt(engine: LocalEngine, system: list[dict[str, str]],
               history: list[dict[str, str]], user: dict[str, str],
               budget: int) -> FittedPrompt:
    """The prompt within `budget` tokens: drop the oldest turns, then clip the message.

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
        return FittedPrompt([*system, *kept, user], tokens, notices)
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
            return FittedPrompt([*system, clipped], tokens, notices)
        room -= max(8, (len(tokens) - budget) * 2)  # token boundaries shift when re-split
    raise FloeError(f"the system prompt alone does not fit the {engine.n_ctx}-token context"
                    " window; shorten chat.system_prompt or raise model.context_tokens")


class ChatSession:
    """One user's chat state: the store, the settings and the (lazily loaded) local model."""

    def __init__(self, store: Store, config: Config, model_override: str | None = None,
                 env: dict[str, str] | None = None, plugins: Plugins | None = None,
                 paths: Paths | None = None, engine: LocalEngine | None = None) -> None:
        """`engine`: the local model already loaded for these settings (tests, benchmarks
        share one); the session reloads it like its own once the model settings change."""
        self.store = store
        # Without paths (tests, benchmarks) everything lives beside the database.
        folder = store.path.parent
        self.paths = paths or Paths(folder, folder, folder / "cache")
        self.registry = Registry(store, self.paths.adapters_dir)
        self._adapter_synced = False
        self._refused_shared: set[int] = set()  # shared adapters that failed here
        self.plugins = plugins
        # Text attached to a conversation by commands such as /attach: local model only.
        self.attachments: dict[int, list[str]] = {}
        self.config = config
        self.model_override = model_override
        self.learning = Learning(store, self.registry, self.paths, lambda: self.config,
                                 lambda new: self.apply_settings(new).errors, model_override)
        self.env = env  # None: the process environment (FLOE_CLOUD_*, the API key)
        # Facts about the user for the local model only; never sent to a cloud.
        self.private_context: list[str] = []
        self.last_run: ReplyRun | None = None
        self.interrupted = 0  # replies found interrupted when the store was opened
        self._engine = engine
        self._engine_key = self._wanted_engine_key() if engine is not None else None
        self._engine_lock = threading.Lock()
        self._base_engine: LocalEngine | None = None
        self._cloud_client: CloudClient | None = None

    @classmethod
    def open(cls, paths: Paths, config: Config, model_override: str | None = None,
             plugins: Plugins | None = None, env: dict[str, str] | None = None,
             engine: LocalEngine | None = None) -> ChatSession:
        """The session over the user's database, as the chat and the CLI use it: replies a
        killed Floe left streaming are marked interrupted first (counted in `interrupted`)."""
        store = Store(paths.database)
        interrupted = store.mark_interrupted()
        session = cls(store, config, model_override=model_override, env=env, plugins=plugins,
                      paths=paths, engine=engine)
        session.interrupted = interrupted
        return session

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

    def base_engine(self) -> LocalEngine:
        """A second instance of the local model, for the proxy-tuning form's base."""
        main = self.engine()
        if self._base_engine is None or self._base_engine.path != main.path:
            self._base_engine = LocalEngine.load(main.path, threads=main.threads,
                                                 context_tokens=main.n_ctx)
        return self._base_engine

    def sampling(self) -> Sampling:
        """The chat settings' sampling, with the model file's recommendations if it has any."""
        recommended = self._engine.recommended_sampling if self._engine is not None else None
        return sampling_from_settings(self.config.chat, recommended)

    def private_notes(self, conversation_id: int) -> list[str]:
        """Everything for the local model only: memory notes, plugin context, attachments."""
        plugin_context = self.plugins.context() if self.plugins else []
        memories = [text for _, text in self.store.memories()]
        return [*self.private_context, *memories, *plugin_context,
                *self.attachments.get(conversation_id, [])]

    def remember(self, text: str) -> int:
        """Store a memory note; the local model sees it from the next message on."""
        note = " ".join(text.split())
        if not note:
            raise FloeError("nothing to remember: /remember TEXT")
        if len(note) > MEMORY_MAX_CHARS:
            raise FloeError(f"a memory note is at most {MEMORY_MAX_CHARS:,} characters"
                            f" ({len(note):,} given); /attach a file for longer text")
        return self.store.add_memory(note)

    @staticmethod
    def _local_system(public: dict[str, str], notes: list[str]) -> dict[str, str]:
        """The system message for the local model: the public one plus private context."""
        if not notes:
            return public
        listed = "\n".join(f"- {note}" for note in notes)
        return {"role": "system",
                "content": f"{public['content']}\n\nWhat you know (private):\n{listed}"}

    def run_command(self, conversation_id: int | None, text: str) -> str:
        """Run `/name args`, a built-in command or a plugin's; returns the text to show."""
        name, _, args = text.strip().removeprefix("/").partition(" ")
        name = name or "help"
        # Until the chat has loaded the plugins (in the background), the built-in ones answer.
        plugins = self.plugins if self.plugins is not None else Plugins(env={"FLOE_PLUGINS": ""})
        commands = plugins.commands()
        if self.plugins is None and name not in commands:
            raise FloeError(f"no command /{name}: plugins are not loaded")
        return plugins.run_command(name, args.strip(),
                                   CommandContext(self, conversation_id, commands))

    # Learning

    def sync_adapter(self, engine: LocalEngine) -> list[str]:
        """Apply the registry's active adapter, composed with the newest shared adapter from
        federated rounds, if the engine has another one; returns notices.

        A version whose file is missing, corrupt or refused by llama.cpp is marked broken
        and the one used before it takes its place, so the chat always has a working model.
        A shared adapter that cannot be used is left out (with a notice) until a newer one
        arrives.
        """
        notices = []
        while True:
            row = self.registry.active()
            problem = self.registry.problem(row) if row is not None else None
            if problem is None:
                path, shared = self._adapter_path(row, notices)
                if engine.adapter_path == path:
                    break
                try:
                    engine.set_adapter(path)
                    if self._adapter_synced:
                        notices.append(_using(row, shared))
                    break
                except ModelError as exc:
                    if shared is not None:  # try again without the shared part
                        self._refused_shared.add(shared.id)
                        notices.append(f"The shared adapter cannot be used: {exc}.")
                        continue
                    if row is None:  # removing an adapter failed: nothing to fall back to
                        raise
                    problem = str(exc)
            assert row is not None  # (problem is only set for a row)
            self.registry.mark_broken(row, problem)
            previous = self.registry.rollback()
            notices.append(f"Adapter v{row.version} cannot be used: {problem}. Using "
                           + (f"v{previous} instead." if previous else "the base model."))
        self._adapter_synced = True
        return notices

    def _adapter_path(self, row: AdapterRow | None,
                      notices: list[str]) -> tuple[Path | None, SharedAdapter | None]:
        """The file to apply for personal version `row` and the shared adapter used."""
        personal = Path(row.path) if row is not None else None
        shared = self.registry.latest_shared(exclude=self._refused_shared)
        if shared is None:
            return personal, None
        try:
            return self.registry.composed(row, shared), shared
        except FloeError as exc:
            self._refused_shared.add(shared.id)
            notices.append(f"The shared adapter cannot be used: {exc}.")
            return personal, None

    def federation_lines(self) -> list[str]:
        """The sync service, rounds joined and privacy spent (settings screen)."""
        from floe_app.federated.service import sync_summary

        return sync_summary(self.paths).lines(self.config.federation.delta)

    # Settings

    def apply_settings(self, new: Config) -> SettingsApplied:
        """Use `new` from now on and save it to the config file; opting in or out of
        federated rounds starts or stops the sync service (seconds: call this off the UI
        thread). Says what changed, for the interface to show."""
        before = self.config
        self.config = new
        applied = SettingsApplied(reload_model=new.model != before.model)
        try:
            path = write_config(self.paths, new)
        except OSError as exc:
            applied.errors.append(f"Settings apply now but could not be saved: {exc.strerror}")
        else:
            applied.notices.append(f"Settings saved to {path}")
        try:
            notice = self._federation_changed(before.federation)
        except FloeError as exc:
            applied.errors.append(f"Federated sync: {exc}")
        else:
            if notice:
                applied.notices.append(notice)
        return applied

    def _federation_changed(self, before: FederationSettings) -> str | None:
        """After settings are applied: opting out stops the sync service at once (the device
        also checks before every upload); opting in starts it. FloeError if it cannot."""
        from floe_app.federated import service
        from floe_app.personalize.tiers import tier_for

        after = self.config.federation
        if before.enabled and not after.enabled:
            service.stop_sync(self.paths)
            return "Opted out of federated rounds: nothing more is uploaded."
        if after.enabled and not before.enabled:
            state = service.start_sync(self.paths, self.config,
                                       tier_for(self.config.learning)[0].rank)
            return (f"Federated sync started (rank {state.rank}): it joins {state.address}"
                    " when this computer is idle and on power.")
        return None

    # The cloud

    def cloud_target(self) -> CloudTarget | None:
        """The configured cloud, or None when there is none or local-only is on."""
        if self.config.privacy.local_only:
            return None
        return CloudTarget.from_settings(self.config.cloud, self.env)

    def resolve_mode(self, requested: str | None,
                     conversation: Conversation | None = None) -> tuple[str, str | None]:
        """The mode a reply will use, and a notice when it cannot be the one asked for."""
        wanted = requested or (conversation.mode if conversation else None) \
            or self.config.chat.mode
        has_cloud = self.cloud_target() is not None
        if wanted == "auto":
            return ("fused" if has_cloud else "local"), None
        if wanted in ("cloud", "fused") and not has_cloud:
            why = ("local-only is on" if self.config.privacy.local_only else
                   "no cloud is configured (cloud.base_url and cloud.model in settings,"
                   " or FLOE_CLOUD_BASE_URL and FLOE_CLOUD_MODEL)")
            return "local", f"Replying locally: {why}."
        return wanted, None

    def cloud_client(self, target: CloudTarget) -> CloudClient:
        """One client per target, kept so that its connections (and profile) are reused."""
        if self._cloud_client is None or self._cloud_client.target != target:
            cache = ProfileCache(self.paths.cache_dir / "cloud_profiles.json")
            self._cloud_client = CloudClient(target, cache)
        return self._cloud_client

    def warm_cloud(self) -> None:
        """Set the cloud client up, and learn its profile, in the background if replies
        will use it (a first probe is a few tiny requests, each in the ledger)."""
        target = self.cloud_target()
        if target is not None and self.resolve_mode(None)[0] != "local":
            client = self.cloud_client(target)

            def warm() -> None:
                client.warm()
                with contextlib.suppress(CloudUnavailable):  # the reply will say why
                    client.profile(self._ledger_recorder(None, "probe"))
            threading.Thread(target=warm, daemon=True).start()

    def test_cloud(self, config: Config) -> str:
        """Settings' "Test connection": probe the cloud `config` describes; one line."""
        session = ChatSession(self.store, config, self.model_override, self.env, None,
                              self.paths)
        try:
            profile = session.probe_cloud()
        except FloeError as exc:
            return f"Cannot use this cloud: {exc}"
        return f"Works: {profile.describe()}."

    def probe_cloud(self) -> CloudProfile:
        """Probe the configured cloud now (`floe cloud probe`, settings' Test connection).
        Raises FloeError with the reason when it cannot be used."""
        target = self.cloud_target()
        if target is None:
            raise FloeError("no cloud is configured (cloud.base_url and cloud.model, or"
                            " FLOE_CLOUD_BASE_URL and FLOE_CLOUD_MODEL)"
                            + ("; local-only is on" if self.config.privacy.local_only else ""))
        client = self.cloud_client(target)
        try:
            if target.provider != "auto":  # a preset: still show what the cloud really does
                found = probe(client, self._ledger_recorder(None, "probe"))
                return replace(found, notes=(*found.notes, "in use: "
                                             + (client.known_profile or found).describe()))
            return client.profile(self._ledger_recorder(None, "probe"), force=True)
        except CloudUnavailable as exc:
            raise FloeError(f"cloud {target.base_url} ({target.model}): {exc}") from exc

    def _ledger_recorder(self, conversation_id: int | None, purpose: str) -> Recorder:
        def record(entry: LedgerEntry) -> Callable[[LedgerEntry], None]:
            ledger_id = self.store.record_request(
                endpoint=entry.endpoint, model=entry.model, text_sent=entry.text_sent,
                bytes_sent=entry.bytes_sent, conversation_id=conversation_id,
                purpose=entry.purpose or purpose)
            return lambda done: self.store.finish_request(
                ledger_id, bytes_received=done.bytes_received, outcome=done.outcome)
        return record

    # Conversations

    def new_conversation(self) -> int:
        return self.store.create_conversation(DEFAULT_TITLE)

    def reply(self, conversation_id: int, text: str, cancel: threading.Event | None = None,
              mode: str | None = None) -> Iterator[ReplyEvent]:
        """Store the user's message, then stream and store the reply in the chosen mode."""
        if not text.strip():
            raise FloeError("the message is empty: type something to send")
        conversation = self.store.conversation(conversation_id)
        if conversation is None:
            raise FloeError(f"no conversation with id {conversation_id}")
        history = self.store.messages(conversation_id)
        yield Saved(self.store.add_message(conversation_id, "user", text))
        if conversation.title == DEFAULT_TITLE and not history:
            self.store.rename_conversation(conversation_id, title_from(text))
        mode, mode_notice = self.resolve_mode(mode, conversation)
        if mode_notice:
            yield Notice(mode_notice)
        engine = self.engine()
        for notice in self.sync_adapter(engine):
            yield Notice(notice)
        sampling = self.sampling()
        public_system = {"role": "system", "content": self.config.chat.system_prompt}
        notes = self.private_notes(conversation_id)
        system = [self._local_system(public_system, notes)]
        past = [{"role": m.role, "content": m.content} for m in history
                if m.role in ("user", "assistant") and m.content]
        reserve = min(sampling.max_tokens, engine.n_ctx // 2)
        prompt = fit_prompt(engine, system, past, {"role": "user", "content": text},
                            engine.n_ctx - reserve)
        for notice in prompt.notices:
            yield Notice(notice)
        stats = GenerationStats()
        run = ReplyRun(mode=mode, stats=stats, clipped=bool(prompt.notices),
                       private=bool(notes))
        self.last_run = run  # per-token timings, for benchmarks and diagnostics
        if mode == "local":
            pieces: Iterator[str | Notice] = (
                step.text for step in engine.generate(prompt.tokens, sampling, cancel, stats))
        else:
            target = self.cloud_target()
            assert target is not None
            # The same turns the local model sees, minus the private context, redacted.
            run.public_messages = [public_system, *prompt.messages[1:]]
            public_text = "\n".join(m["content"] for m in run.public_messages)
            run.redactor = Redactor(
                terms=list(self.config.privacy.redact_terms),
                secrets=private_terms(notes, public_text),
                patterns=self.plugins.redaction_patterns() if self.plugins else [])
            cloud_messages = [{"role": m["role"], "content": run.redactor.redact(m["content"])}
                              for m in run.public_messages]
            run.fusion = FusionStats()
            run.recorder = self._ledger_recorder(conversation_id, mode)
            pieces = (self._fused_pieces if mode == "fused" else self._cloud_pieces)(
                engine, self.cloud_client(target), cloud_messages, run, prompt.tokens,
                sampling, cancel)
        yield from self._write_reply(conversation_id, engine.name, pieces, run)

    def _fused_pieces(self, engine: LocalEngine, client: CloudClient,
                      cloud_messages: list[dict[str, str]], run: ReplyRun, tokens: list[int],
                      sampling: Sampling, cancel: threading.Event | None
                      ) -> Iterator[str | Notice]:
        assert run.redactor is not None and run.fusion is not None
        profile = client.known_profile
        if profile is not None and not profile.fusable:
            # Nothing to fuse with: no request is sent, and the reply says so once.
            run.fusion.breaker = run.fusion.method = profile.describe()
            yield Notice(f"Replying locally: this cloud ({client.target.model}) streams no"
                         " log-probabilities, so it cannot be fused; cloud mode (F4) shows its"
                         " own text.")
            for step in engine.generate(tokens, sampling, cancel, run.stats):
                yield step.text
            return
        private = None
        if run.private or engine.adapter_path is not None:
            # The same model without the private context and adapter, in its own llama.cpp
            # context so the two prompts do not evict each other's cache: how much they
            # move the local choice decides how far the cloud is trusted (fusion.py).
            base = self.base_engine()
            base_prompt = base.chat_tokens(run.public_messages)
            spare = cpu_info().physical_cores - engine.max_threads
            base.set_threads(spare if spare > 0 else engine.max_threads)
            private = PrivateCheck(
                with_private=lambda generated: engine.next_token_logprobs(tokens + generated),
                without=lambda generated: base.next_token_logprobs(base_prompt + generated),
                beside=spare > 0)
            if private.beside:
                private.warm()
        chooser = FusedChooser(engine.vocabulary(), client, cloud_messages, run.redactor,
                               self.config.fusion, sampling, run.fusion, private,
                               run.recorder, lambda text: engine.tokenize(text, special=False))
        shown = 0
        try:
            for step in engine.generate(tokens, sampling, cancel, run.stats, chooser):
                while shown < len(chooser.notices):
                    yield Notice(chooser.notices[shown])
                    shown += 1
                run.source = step.source
                yield step.text
            while shown < len(chooser.notices):
                yield Notice(chooser.notices[shown])
                shown += 1
            stream = chooser.stream
            if stream is not None and stream.entry is None and not stream.done:
                yield Notice("This reply is local: Floe was still finding out what the cloud"
                             " can do (a few tiny requests, once); the next reply uses it.")
        finally:
            chooser.close()

    def _cloud_pieces(self, engine: LocalEngine, client: CloudClient,
                      cloud_messages: list[dict[str, str]], run: ReplyRun, tokens: list[int],
                      sampling: Sampling, cancel: threading.Event | None
                      ) -> Iterator[str | Notice]:
        """The cloud's own text; if it fails, the local model finishes the reply."""
        assert run.fusion is not None
        stats = run.stats
        stream = client.stream(cloud_messages, "", max_tokens=sampling.max_tokens,
                               recorder=run.recorder, logprobs=False)
        run.fusion.requests += 1
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stats.begin()
        try:
            for token in stream.follow(cancel):
                stats.token()
                yield decoder.decode(token.text)
        finally:
            stream.cancel()
            stream.wait_until(lambda: stream.done, 1.0)
            if stream.entry is not None:
                run.fusion.bytes_sent += stream.entry.bytes_sent
                run.fusion.bytes_received += stream.entry.bytes_received
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            return
        if stream.outcome in (OK, CANCELLED):
            stats.finish_reason = "stop" if stream.finished else "length"
            return
        reason = FAILURE_TEXT.get(stream.outcome, stream.outcome)
        run.fusion.breaker = reason
        yield Notice(f"Cloud failed ({reason}); the local model "
                     + ("finishes this reply." if stream.text else "answers instead."))
        partial = stream.text.decode("utf-8", errors="ignore")
        continuation = tokens + (engine.tokenize(partial, special=False) if partial else [])
        for step in engine.generate(continuation, sampling, cancel, stats):
            yield step.text

    def _write_reply(self, conversation_id: int, model: str, pieces: Iterator[str | Notice],
                     run: ReplyRun) -> Iterator[ReplyEvent]:
        """Stream the reply to the caller and the database; restore redacted values."""
        reply_id = self.store.add_message(conversation_id, "assistant", "", status="streaming",
                                          model=model, mode=run.mode)
        restorer = Restorer(run.redactor) if run.redactor is not None else None
        parts: list[str] = []
        last_flush = time.monotonic()
        status = "error"
        with replying(self.paths.data_dir):  # a background training job waits meanwhile
            try:
                for piece in pieces:
                    if isinstance(piece, Notice):
                        yield piece
                        continue
                    text = restorer.feed(piece) if restorer else piece
                    if not text:
                        continue
                    parts.append(text)
                    extend(run.provenance, len(text), run.source)
                    yield Delta(text)
                    if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                        self.store.update_message(reply_id, content="".join(parts))
                        last_flush = time.monotonic()
                tail = restorer.flush() if restorer else ""
                if tail:
                    parts.append(tail)
                    yield Delta(tail)
                status = "stopped" if run.stats.finish_reason == "cancelled" else "complete"
            except (GeneratorExit, KeyboardInterrupt):
                status = "stopped"
                raise
            finally:
                summary = run.summary()
                self.store.update_message(reply_id, content="".join(parts), status=status,
                                          stats=summary)
        yield Finished(reply_id, "".join(parts), status, summary)


MEMORY_MAX_CHARS = 2_000


@dataclass
class CommandContext:
    """What a plugin command may do to the conversation it was typed in."""

    session: ChatSession
    conversation_id: int | None
    commands: dict[str, Command]  # every command there is (for /help)

    def attach(self, label: str, text: str) -> None:
        """Give text to the local model (never to a cloud) for the rest of this chat."""
        if self.conversation_id is None:
            raise FloeError("start a chat before attaching to it")
        self.session.attachments.setdefault(self.conversation_id, []).append(
            f"{label}:\n{text}")


@dataclass
class ReplyRun:
    """What one reply needs besides its text: mode, timing, redaction, cloud counters."""

    mode: str
    stats: GenerationStats
    clipped: bool = False
    private: bool = False  # the local model saw private context the cloud does not
    redactor: Redactor | None = None
    fusion: FusionStats | None = None
    public_messages: list[dict[str, str]] = field(default_factory=list)
    recorder: Recorder | None = None
    source: str = "local"  # where the text being written came from (provenance.py)
    provenance: Spans = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        stats = self.stats
        summary: dict[str, Any] = {
            "mode": self.mode,
            "ttft_ms": round(stats.ttft_ms, 1),
            "tokens": stats.tokens,
            "tokens_per_s": round(stats.tokens_per_s, 1),
            "p95_gap_ms": round(percentile(stats.gaps_ms, 95), 1),
            "prompt_tokens": stats.prompt_tokens,
            "finish_reason": stats.finish_reason,
            "clipped": self.clipped,
        }
        if self.fusion is not None:
            summary["cloud"] = self.fusion.summary()
            if self.mode == "fused":
                summary["cloud"]["batches"] = {
                    "count": stats.batches,
                    "accepted": round(stats.accepted / max(1, stats.tokens), 3),
                    "mean_length": round(stats.drafted / max(1, stats.batches), 1),
                    "acceptance": round(stats.accepted / max(1, stats.drafted), 3),
                    "scoring_ms": round(stats.scoring_s * 1000, 1),
                    "decoding_ms": round(stats.decoding_s * 1000, 1)}
                summary["provenance"] = self.provenance
        return summary


def conversation_markdown(conversation: Conversation, messages: list[Message],
                          provenance_colour: bool | None = None) -> str:
    """A conversation as a Markdown document, for export and `floe history show`; with
    `provenance_colour` (True: ANSI colours, False: tags) each fused reply's stretches are
    marked by where they came from, after a legend."""
    lines = [f"# {conversation.title}", "", f"_Started {conversation.created_at}_", ""]
    if provenance_colour is not None:
        lines += [legend(provenance_colour), ""]
    for message in messages:
        who = {"user": "You", "assistant": "Floe"}.get(message.role, message.role.title())
        notes = [] if message.status == "complete" else [message.status]
        body = message.content or "_(no text)_"
        spans = message.stats.get("provenance") if message.role == "assistant" else None
        if provenance_colour is not None and spans:
            notes.append(f"{message.mode}: " + ", ".join(
                f"{source} {share:.0%}" for source, share in shares(spans).items()))
            body = render(message.content, spans, provenance_colour)
        note = f" _({'; '.join(notes)})_" if notes else ""
        lines += [f"## {who}{note}", "", body, ""]
    return "\n".join(lines)


def export_conversation(conversation: Conversation, messages: list[Message],
                        fmt: str = "markdown", output: Path | None = None,
                        folder: Path = Path()) -> Path:
    """Write a conversation to `output` (default: floe-ID.md, or floe-ID.json, in `folder`)
    as Markdown or JSON; returns the path. FloeError when it cannot be written."""
    if fmt == "json":
        text = json.dumps({"conversation": vars(conversation),
                           "messages": [vars(m) for m in messages]},
                          ensure_ascii=False, indent=2)
    else:
        text = conversation_markdown(conversation, messages)
    path = output or folder / f"floe-{conversation.id}.{'json' if fmt == 'json' else 'md'}"
    try:
        path.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise FloeError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL byte in the name
        raise FloeError(f"cannot write {str(path)!r}: {exc}") from exc
    return path


def _using(row: AdapterRow | None, shared: SharedAdapter | None) -> str:
    personal = f"adapter v{row.version}" if row is not None else None
    common = (f"the shared adapter (round {shared.round or 'final'})"
              if shared is not None else None)
    if personal is None and common is None:
        return "Now using the base model without an adapter."
    return "Now using " + " with ".join(p for p in (personal, common) if p) + "."
