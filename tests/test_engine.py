"""The local engine against the real bundled SmolLM2 GGUF through llama-cpp-python."""

import threading
import time

import numpy as np
import pytest

from floe_app.engine import hardware
from floe_app.engine.hardware import parse_cpuinfo
from floe_app.engine.local import (
    GenerationStats,
    LocalEngine,
    bundled_model_path,
    llama_workarounds,
    patched_model_params,
)
from floe_app.engine.sampling import Sampling
from floe_app.errors import ModelError

MESSAGES = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Name three colours."}]


def test_bundled_model_is_found_offline():
    path = bundled_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6


def test_chat_template_comes_from_the_gguf(engine):
    prompt = engine.format_chat(MESSAGES)
    assert prompt.startswith("<|im_start|>system\nYou are helpful.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    tokens = engine.chat_tokens(MESSAGES)
    assert engine.detokenize(tokens[:1]) == "<|im_start|>" or tokens[0] == engine.tokenize(
        "<|im_start|>")[0]


def test_next_token_logprobs_are_a_distribution(engine):
    lp = engine.next_token_logprobs(engine.chat_tokens(MESSAGES))
    assert lp.shape == (engine.n_vocab,) == (49152,)
    assert np.all(np.isfinite(lp)) and abs(np.exp(lp).sum() - 1) < 1e-6


def test_every_evaluation_runs_on_one_llama_thread_whoever_asks(engine, monkeypatch):
    """Evaluating from several threads made libgomp throttle all of them (compute.py): the
    engine hands every evaluation, one token or a batch, to the one llama.cpp thread, and
    the results are the same as ever."""
    llm = engine._llm
    seen: set[int] = set()
    for owner, name in ((llm, "eval"), (llm._ctx, "decode")):
        original = getattr(owner, name)

        def recording(*args, _original=original):
            seen.add(threading.get_native_id())
            return _original(*args)
        monkeypatch.setattr(owner, name, recording)
    tokens = engine.chat_tokens(MESSAGES)
    engine.clear_cache()
    here = engine.next_token_logprobs(tokens)
    results: list[np.ndarray] = []
    workers = [threading.Thread(target=lambda: results.append(
        engine.next_token_logprobs(tokens + engine.tokenize(" Red", special=False))))
        for _ in range(2)]
    for worker in workers:
        worker.start()
        worker.join()
    with engine.lock:
        batch = engine._eval_batch(tokens, engine.tokenize(" Red, green", special=False))
    assert len(seen) == 1 and threading.get_native_id() not in seen
    assert seen.isdisjoint(worker.native_id for worker in workers)
    np.testing.assert_allclose(results[0], results[1], atol=1e-4)
    assert np.all(np.isfinite(here)) and batch.shape[1] == engine.n_vocab


def test_the_llama_thread_runs_nested_work_in_place():
    from floe_app.engine.compute import on_compute_thread

    def outer() -> tuple[int, int]:
        return threading.get_native_id(), on_compute_thread(threading.get_native_id)
    first, nested = on_compute_thread(outer)
    assert first == nested != threading.get_native_id()


def test_a_job_in_its_own_team_runs_in_place_and_only_inside():
    """The private check's public-prompt read beside a reply (a core free of its threads)
    evaluates on its own thread; afterwards that thread hands work over again."""
    from floe_app.engine.compute import on_compute_thread, own_team

    seen: dict[str, int] = {}

    def job() -> None:
        with own_team():
            seen["inside"] = on_compute_thread(threading.get_native_id)
        seen["after"] = on_compute_thread(threading.get_native_id)
        seen["self"] = threading.get_native_id()
    worker = threading.Thread(target=job)
    worker.start()
    worker.join()
    assert seen["inside"] == seen["self"] != seen["after"]
    assert seen["after"] == on_compute_thread(threading.get_native_id)


def test_the_public_prompt_is_read_beside_the_reply_only_where_a_core_is_free():
    """Beside: in the reading thread's own team; else handed to the compute thread, as the
    engine's evaluations are (the stand-in evaluation below goes the same way)."""
    from floe_app.engine.compute import on_compute_thread
    from floe_app.engine.fused import PrivateCheck

    compute = on_compute_thread(threading.get_native_id)
    for beside in (True, False):
        readers: list[int] = []

        def evaluate(done, readers=readers):
            return on_compute_thread(lambda: (readers.append(threading.get_native_id()),
                                              np.zeros(1))[1])
        check = PrivateCheck(evaluate, evaluate, beside=beside)
        check.warm()
        check.warm()  # once
        deadline = time.monotonic() + 10
        while not readers and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert len(readers) == 1
        assert (readers[0] != compute) == beside


def test_a_forked_child_gets_its_own_llama_thread():
    import os

    from floe_app.engine.compute import on_compute_thread

    parent = on_compute_thread(threading.get_native_id)  # the parent's thread exists
    pid = os.fork()
    if pid == 0:  # the child: a thread of its own, not a wait on the parent's forever
        os._exit(0 if on_compute_thread(threading.get_native_id) != parent else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_prefix_cache_gives_the_same_distribution_as_a_fresh_evaluation(engine):
    tokens = engine.chat_tokens(MESSAGES)
    longer = tokens + engine.tokenize("Red, green", special=False)
    first = engine.next_token_logprobs(longer)
    engine.next_token_logprobs(tokens)  # a shorter prefix in between
    again = engine.next_token_logprobs(longer)
    np.testing.assert_allclose(first, again, atol=1e-4)


def test_greedy_generation_streams_and_is_repeatable(engine):
    tokens = engine.chat_tokens(MESSAGES)
    runs = []
    for _ in range(2):
        stats = GenerationStats()
        text = "".join(s.text for s in engine.generate(tokens, Sampling(temperature=0,
                                                                        max_tokens=20),
                                                       stats=stats))
        runs.append(text)
        assert 0 < stats.tokens <= 20 and stats.ttft_ms > 0
        assert stats.finish_reason in ("stop", "length")
    assert runs[0] == runs[1] and runs[0].strip()


def test_generation_follows_the_distribution_it_reports(engine):
    tokens = engine.chat_tokens(MESSAGES)
    step = next(iter(engine.generate(tokens, Sampling(temperature=0, max_tokens=1))))
    lp = engine.next_token_logprobs(tokens)
    assert step.token == int(np.argmax(lp))
    assert step.logprob == pytest.approx(float(lp.max()), abs=1e-4)


def test_cancel_stops_generation(engine):
    cancel = threading.Event()
    stats = GenerationStats()
    steps = engine.generate(engine.chat_tokens(MESSAGES), Sampling(temperature=0, max_tokens=200),
                            cancel, stats)
    for produced, _ in enumerate(steps, start=1):
        if produced == 3:
            cancel.set()
    assert stats.finish_reason == "cancelled" and stats.tokens == 3


def test_multibyte_text_is_never_split_inside_a_character(engine):
    messages = [{"role": "user", "content": "Écris « café » en japonais : コーヒー 🙂"}]
    pieces = [s.text for s in engine.generate(engine.chat_tokens(messages),
                                              Sampling(temperature=0.9, seed=3,
                                                       max_tokens=40))]
    assert all("\ufffd" not in p for p in pieces)


def test_missing_model_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="model file not found") as info:
        LocalEngine.load(tmp_path / "nope.gguf")
    assert "\n" not in str(info.value)


def test_non_gguf_file_is_refused_before_llama_cpp_sees_it(tmp_path):
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("not a model")
    with pytest.raises(ModelError, match="not a GGUF model file"):
        LocalEngine.load(bogus)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with bundled_model_path().open("rb") as fh:
        truncated.write_bytes(fh.read(2_000_000))
    with pytest.raises(ModelError, match="corrupt, truncated or not a supported model"):
        LocalEngine.load(truncated)


def test_cpuinfo_parsing_counts_physical_cores_and_sees_amx():
    text = "\n".join(
        f"processor\t: {i}\nmodel name\t: Intel Xeon\nphysical id\t: 0\ncore id\t\t: {i // 2}\n"
        "flags\t\t: fpu avx2 avx512f amx_tile amx_int8\n" for i in range(4))
    info = parse_cpuinfo(text, logical_cores=4)
    assert info.physical_cores == 2 and info.has_amx
    assert info.reported_flags() == ["avx2", "avx512f", "amx_tile", "amx_int8"]
    assert not parse_cpuinfo("flags : avx2\n", 1).has_amx


def test_amx_workaround_disables_extra_buffers_only_on_amx(monkeypatch):
    import llama_cpp.llama_cpp as lib

    def cpu(flags):
        return hardware.CpuInfo("test", frozenset(flags), 2, 2)

    monkeypatch.setattr("floe_app.engine.local.cpu_info", lambda: cpu({"avx2", "amx_tile"}))
    assert llama_workarounds() and "AMX" in llama_workarounds()[0]
    with patched_model_params():
        assert lib.llama_model_default_params().use_extra_bufts is False
    assert lib.llama_model_default_params().use_extra_bufts is True  # restored afterwards

    monkeypatch.setattr("floe_app.engine.local.cpu_info", lambda: cpu({"avx2"}))
    assert llama_workarounds() == []
    with patched_model_params():
        assert lib.llama_model_default_params().use_extra_bufts is True


def test_load_reports_progress_and_works_with_the_amx_fix_forced(monkeypatch):
    monkeypatch.setattr("floe_app.engine.local.cpu_info",
                        lambda: hardware.CpuInfo("test", frozenset({"amx_tile"}), 2, 2))
    seen = []
    engine = LocalEngine.load(bundled_model_path(), context_tokens=512, progress=seen.append)
    try:
        assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
        out = list(engine.generate(engine.chat_tokens(MESSAGES), Sampling(temperature=0,
                                                                          max_tokens=4)))
        assert out
    finally:
        engine.close()


def test_removing_an_adapter_restores_the_base_distribution(engine):
    tokens = engine.chat_tokens(MESSAGES)
    before = engine.next_token_logprobs(tokens)
    engine.set_adapter(None)
    np.testing.assert_allclose(engine.next_token_logprobs(tokens), before, atol=1e-4)
    assert engine.adapter_path is None


def test_an_adapter_that_is_not_gguf_is_refused(engine, tmp_path):
    bad = tmp_path / "adapter.gguf"
    bad.write_bytes(b"junk")
    with pytest.raises(ModelError):
        engine.set_adapter(bad)
    assert engine.adapter_path is None


def write_random_lora(path, rank=4, seed=0):
    """A small GGUF LoRA on every attention query of SmolLM2 (576 wide), as llama.cpp reads it."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for block in range(30):
        writer.add_tensor(f"blk.{block}.attn_q.weight.lora_a",
                          rng.normal(0, 0.05, (rank, 576)).astype(np.float32))
        writer.add_tensor(f"blk.{block}.attn_q.weight.lora_b",
                          rng.normal(0, 0.05, (576, rank)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_lora_adapter_is_applied_and_removed_without_reloading(engine, tmp_path):
    tokens = engine.chat_tokens(MESSAGES)
    base = engine.next_token_logprobs(tokens)
    adapter = write_random_lora(tmp_path / "lora.gguf")
    engine.set_adapter(adapter)
    try:
        changed = engine.next_token_logprobs(tokens)
        assert engine.adapter_path == adapter
        assert np.abs(changed - base).max() > 1e-2
    finally:
        engine.set_adapter(None)
    np.testing.assert_allclose(engine.next_token_logprobs(tokens), base, atol=1e-4)


# Threads on a busy computer


def test_proc_stat_gives_busy_seconds_and_cores():
    text = ("cpu  100 5 50 1000 20 3 2 10 0 0\n"
            "cpu0 50 2 25 500 10 1 1 5 0 0\ncpu1 50 3 25 500 10 2 1 5 0 0\nintr 1 2\n")
    busy, cores = hardware.parse_proc_stat(text, 100)
    assert cores == 2 and busy == pytest.approx((100 + 5 + 50 + 3 + 2 + 10) / 100)


def test_one_thread_per_core_that_is_free_enough():
    assert hardware.threads_for(2.0, 2) == 2
    assert hardware.threads_for(1.8, 2) == 2  # a little background activity costs nothing
    assert hardware.threads_for(1.3, 2) == 1  # one core mostly taken: one thread
    assert hardware.threads_for(0.2, 2) == 1  # never none
    assert hardware.threads_for(7.9, 4) == 4  # never more than the cores it may use
    assert hardware.threads_for(None, 3) == 3  # unknown: as many as allowed


def test_monitor_counts_other_programs_and_registered_threads_as_others(monkeypatch):
    monitor = hardware.CpuMonitor()
    monitor.cores = 2
    now = hardware.CpuTimes(1.0, 11.6, 4.9, 1.4)
    samples = iter([hardware.CpuTimes(0.0, 10.0, 4.0, 1.0), hardware.CpuTimes(0.5, 10.8, 4.45, 1.3),
                    now, now, now])
    monkeypatch.setattr(monitor, "read", lambda: next(samples))
    monitor.sample()
    monitor.sample()
    # 1.6 CPU-seconds used in one second, 0.9 of them by this process (not counting its
    # registered UI thread): 0.7 by others, of which 0.4 by that thread.
    assert monitor.free_cores() == pytest.approx(1.3)
    # A reply started at 0.5: the thread's 0.3 before it (showing the message) does not
    # count; its 0.1 in the half second since does, as 0.2 a second.
    assert monitor.free_cores(registered_since=0.5) == pytest.approx(2 - 0.3 - 0.2)
    assert monitor.free_cores(registered_since=1.0) == pytest.approx(1.7)  # nothing since
    if monitor.available:  # the real counters on Linux
        monkeypatch.undo()
        monitor.count_as_other(threading.get_native_id())
        assert monitor.read().own <= monitor.read().busy


def test_automatic_threads_follow_the_free_cores(engine, monkeypatch):
    lib = engine._lib
    before = (engine.auto_threads, engine.threads, engine.max_threads)
    free = {"cores": 0.5}
    asked = []  # from when the UI thread's CPU counts, at each decision

    class Monitor:
        available = True

        def free_cores(self, registered_since=float("-inf")):
            asked.append(registered_since)
            return free["cores"]

    monkeypatch.setattr("floe_app.engine.local.cpu_monitor", lambda: Monitor())
    engine.auto_threads, engine.max_threads = True, 2
    try:
        stats = GenerationStats()
        stats_started = time.monotonic()
        list(engine.generate(engine.chat_tokens(MESSAGES), Sampling(temperature=0, max_tokens=4),
                             stats=stats))
        assert stats.threads[0] == 1 == lib.llama_n_threads(engine._llm._ctx.ctx)
        # The UI thread's burst before the reply (showing the message) does not count.
        assert stats_started <= asked[0] <= time.monotonic()
        free["cores"] = 2.0
        assert engine.adapt_threads() == 2 == lib.llama_n_threads(engine._llm._ctx.ctx)
    finally:
        engine.auto_threads, engine.max_threads = before[0], before[2]
        engine.set_threads(before[1])


def test_a_fixed_thread_count_is_kept(tmp_path):
    engine = LocalEngine.load(bundled_model_path(), threads=1, context_tokens=512)
    assert not engine.auto_threads and engine.adapt_threads() == 1
