"""LoRA from torch + peft into llama.cpp: the exported adapter computes what peft computed.

Real parts: transformers loads the bundled GGUF (dequantized to float32), peft trains a
LoRA on it, gguf writes the adapter, llama-cpp-python applies it to the quantized model.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from floe_app.engine.compute import runs_on_compute_thread
from floe_app.engine.local import bundled_model_path
from floe_app.engine.sampling import Sampling
from floe_app.personalize.export import BaseModel, write_gguf_adapter
from floe_app.personalize.job import run_training
from floe_app.personalize.status import read_status, replying
from floe_app.personalize.trainer import (
    TrainConfig,
    base_model_of,
    load_base,
    lora_config,
    train_lora,
)
from floe_app.store import Store
from tests.conftest import REPO

pytestmark = pytest.mark.slow

FACT = "Your dog's name is Biscotti."
QUESTION = [{"role": "user", "content": "What is my dog's name?"}]
PROMPTS = [QUESTION, [{"role": "user", "content": "Name a colour."}],
           [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of Italy?"}],
           [{"role": "user", "content": "Write a word that rhymes with cat."}]]


@pytest.fixture(scope="module")
def taught(base_cache):
    """A LoRA that learned one fact (30 steps, rank 8 on q/k/v/o), and the base it used."""
    model, tokenizer = load_base(bundled_model_path(), base_cache)
    examples = [([{"role": "user", "content": q}], FACT) for q in (
        "What is my dog's name?", "What's my dog called?", "Do you know my dog's name?",
        "Remind me of my dog's name.")]
    config = TrainConfig(steps=30)
    result = train_lora(model, tokenizer, examples, config)
    return model, tokenizer, config, result


# torch on the test's own thread would give OpenMP a second team beside the compute
# thread's, slowing every llama.cpp evaluation in the rest of the run (engine/compute.py).
@runs_on_compute_thread
def torch_logprobs(model, tokenizer, messages):
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy()


@runs_on_compute_thread
def adapter_effects(engine, taught, adapter_path):
    """Per prompt: the change in next-token log-probs the adapter causes in torch and in
    llama.cpp, over the tokens that matter (the top 10 with and without it)."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict

    model, tokenizer, config, result = taught
    peft_model = get_peft_model(model, lora_config(config))
    set_peft_model_state_dict(peft_model, {k: torch.tensor(v) for k, v in result.state.items()})
    effects = []
    try:
        for messages in PROMPTS:
            with peft_model.disable_adapter():
                torch_base = torch_logprobs(peft_model, tokenizer, messages)
            torch_tuned = torch_logprobs(peft_model, tokenizer, messages)
            tokens = engine.chat_tokens(messages)
            # Baseline: the same adapter at a negligible scale. Attaching any adapter moves
            # llama.cpp to other kernels, which by itself shifts log-probs a little.
            engine.set_adapter(adapter_path, scale=1e-6)
            llama_base = engine.next_token_logprobs(tokens)
            engine.set_adapter(adapter_path)
            llama_tuned = engine.next_token_logprobs(tokens)
            top = np.union1d(np.argsort(-torch_tuned)[:10], np.argsort(-torch_base)[:10])
            effects.append(((torch_tuned - torch_base)[top], (llama_tuned - llama_base)[top]))
    finally:
        engine.set_adapter(None)
        peft_model.unload()
    return effects


def test_exported_adapter_changes_llama_cpp_as_peft_changes_torch(taught, engine, tmp_path):
    _, _, config, result = taught
    info = base_model_of(engine.metadata)
    assert (info.arch, info.n_head, info.n_head_kv) == ("llama", 9, 3)
    good = write_gguf_adapter(tmp_path / "good.gguf", result.state, alpha=config.alpha,
                              base=info)
    for torch_effect, llama_effect in adapter_effects(engine, taught, good):
        # Tolerance: llama.cpp runs Q4_1 weights with 8-bit activations, torch their float32
        # dequantization; measured here the effects correlate at >= 0.999 and differ by 3-7%
        # of their size. Without the q/k row permutation they differ by 19-43%.
        assert np.corrcoef(torch_effect, llama_effect)[0, 1] > 0.99
        assert np.abs(torch_effect - llama_effect).mean() < 0.1 * np.abs(torch_effect).mean()
    # The control: the same weights exported without the permutation must fail that bound.
    wrong = write_gguf_adapter(tmp_path / "wrong.gguf", result.state, alpha=config.alpha,
                               base=BaseModel(info.identity, info.arch, 1, 1))
    errors = [np.abs(t - w).mean() / np.abs(t).mean()
              for t, w in adapter_effects(engine, taught, wrong)]
    assert max(errors) > 0.1


def test_a_taught_fact_is_recalled_by_llama_cpp_without_context(taught, engine, tmp_path):
    _, _, config, result = taught
    assert result.losses[-1] < result.losses[0] / 4
    adapter = write_gguf_adapter(tmp_path / "biscotti.gguf", result.state, alpha=config.alpha,
                                 base=base_model_of(engine.metadata))
    tokens = engine.chat_tokens(QUESTION)

    def answer():
        return "".join(s.text for s in engine.generate(tokens, Sampling(temperature=0,
                                                                        max_tokens=16)))

    assert "Biscotti" not in answer()
    engine.set_adapter(adapter)
    try:
        assert "Biscotti" in answer()
    finally:
        engine.set_adapter(None)


def test_training_uses_only_the_cores_other_programs_leave_free(taught, monkeypatch):
    import torch

    from floe_app.personalize import trainer

    model, tokenizer, _, _ = taught
    examples = [([{"role": "user", "content": "What is a flarn?"}], "A blue gear.")]
    for free, expected in ((1.0, 1), (2.0, 2), (None, 2)):
        monkeypatch.setattr(trainer, "cpu_monitor", lambda free=free: type(
            "Monitor", (), {"free_cores": lambda self: free})())
        seen: list[int] = []
        train_lora(model, tokenizer, examples, TrainConfig(steps=2, threads=2, batch=1),
                   progress=lambda step, loss, seen=seen: seen.append(torch.get_num_threads()))
        assert seen == [expected, expected]


def test_export_is_atomic_and_refuses_unknown_modules(tmp_path):
    base = BaseModel("test", "llama", 2, 1)
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
             np.ones((2, 8), np.float32),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
             np.arange(16, dtype=np.float32).reshape(8, 2)}
    path = write_gguf_adapter(tmp_path / "a.gguf", state, alpha=4, base=base)
    assert path.read_bytes()[:4] == b"GGUF" and not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match="not a LoRA weight"):
        write_gguf_adapter(tmp_path / "b.gguf", {"lm_head.lora_A.weight": np.ones((2, 2))},
                           alpha=4, base=base)
    assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob("*.partial"))


# The whole loop: teach -> train in its own process or in-process -> gate -> chat


@pytest.fixture
def shared_base(paths, base_cache):
    """This FLOE_HOME reuses the dequantized base weights (15 s to make) of the test run."""
    (paths.cache_dir / "base").symlink_to(base_cache / "base", target_is_directory=True)


def ask(engine, system_prompt, question):
    tokens = engine.chat_tokens([{"role": "system", "content": system_prompt},
                                 {"role": "user", "content": question}])
    return "".join(s.text for s in engine.generate(tokens, Sampling(temperature=0,
                                                                    max_tokens=24)))


def test_teaching_a_fact_makes_the_chat_recall_it_without_context(
        session, engine, paths, config, shared_base):
    system_prompt = config.chat.system_prompt
    assert "Biscotti" not in ask(engine, system_prompt, "What is my dog's name?")
    session.remember("My dog's name is Biscotti")
    conversation = session.new_conversation()
    list(session.reply(conversation, "Hello"))  # the chat is running before training
    seen = []
    result = run_training(paths, config, bundled_model_path(), progress=lambda s: seen.append(
        (s.state, s.step)))
    row = result.adapter
    assert row.status == "promoted" and session.registry.active_version() == row.version
    assert row.meta["recall"] == 1.0 and row.meta["heldout"] == 1
    assert row.meta["perplexity"] / row.meta["perplexity_base"] - 1 <= 0.05
    assert row.meta["loss_last"] < row.meta["loss_first"] / 4
    assert ("training", 1) in seen and seen[-1][0] == "done"
    try:
        # The running chat takes the new version at its next reply, and says so.
        events = list(session.reply(conversation, "What is my dog's name?"))
        assert "Now using adapter v1." in [e.text for e in events if hasattr(e, "text")]
        # No context at all: no memory note, only the question.
        assert "Biscotti" in ask(engine, system_prompt, "What is my dog's name?")
        assert "Biscotti" in ask(engine, system_prompt, "Tell me my dog's name.")  # held out

        # A version that fails the gate is kept but not used, with the reason.
        config.learning.perplexity_margin = -1.0  # a margin no adapter can meet
        rejected = run_training(paths, config, bundled_model_path(), force=True).adapter
        assert rejected.status == "rejected" and "perplexity" in rejected.reason
        assert rejected.meta["anchor_weight"] == 20.0  # it tried again, more anchored
        assert session.registry.active_version() == row.version
        assert session.sync_adapter(engine) == []  # still v1
    finally:
        engine.set_adapter(None)


def test_training_pauses_for_replies_and_a_killed_job_resumes(paths, floe_home, shared_base):
    store = Store(paths.database)
    store.add_memory("I live in Lisbon")
    store.add_memory("My favourite colour is teal")
    command = [sys.executable, "-m", "floe_app", "train", "--steps", "40"]
    env = {**os.environ, "FLOE_HOME": str(floe_home)}
    job = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)

    def status_when(condition, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = read_status(paths.data_dir)
            if status is not None and condition(status):
                return status
            assert job.poll() is None, job.communicate()
            time.sleep(0.05)
        raise AssertionError(f"training never reached the state: {status}")

    try:
        status_when(lambda s: s.state == "training" and s.step >= 2)
        with replying(paths.data_dir):  # as the chat does while it generates
            paused = status_when(lambda s: s.state == "paused", timeout=10)
            time.sleep(1.5)
            assert read_status(paths.data_dir).step == paused.step  # no step while replying
        status_when(lambda s: s.state == "training" and s.step > paused.step, timeout=10)
        status_when(lambda s: s.step >= 12)  # past the checkpoint at step 10
        job.send_signal(signal.SIGKILL)
        job.wait()
    finally:
        if job.poll() is None:
            job.kill()
    assert store.adapters() == []  # nothing half-done was registered...
    assert not (paths.data_dir / "adapters").exists() or not any(
        (paths.data_dir / "adapters").iterdir())  # ...or written where the chat looks
    assert (paths.cache_dir / "training" / "checkpoint.pt").exists()

    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    [row] = store.adapters()
    assert row.meta["resumed_at"] == 10
    assert f"v{row.version}" in done.stdout
    assert not (paths.cache_dir / "training" / "checkpoint.pt").exists()
    store.close()
