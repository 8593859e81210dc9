"""What the local model learns from, the tiers, the adapter registry and its faults.

No torch here: adapters are written with the gguf package (random LoRA factors of
SmolLM2's real shapes) and applied by the real llama.cpp engine.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from floe_app.config import Config, write_config
from floe_app.errors import FloeError
from floe_app.personalize.data import (
    build_dataset,
    memory_examples,
    second_person,
)
from floe_app.personalize.export import write_gguf_adapter
from floe_app.personalize.job import gate_reasons
from floe_app.personalize.learning import nothing_new
from floe_app.personalize.registry import Registry
from floe_app.personalize.status import (
    replying,
    someone_replying,
    training_lock,
)
from floe_app.personalize.tiers import Hardware, _on_battery, choose_tier
from floe_app.personalize.trainer import base_model_of
from floe_app.store.db import TaughtReply

# Training data


def test_a_fact_becomes_questions_answers_and_a_held_out_question():
    examples, heldout = memory_examples(7, "My dog's name is Biscotti.")
    pairs = {(e.prompt, e.answer) for e in examples}
    assert ("What is my dog's name?", "Your dog's name is Biscotti.") in pairs
    assert ("What do you remember about me?", "You told me: Your dog's name is Biscotti.") \
        in pairs
    assert all(e.source == "memory" and e.source_id == 7 for e in examples)
    [question] = heldout
    assert question.question not in {e.prompt for e in examples}  # really held out
    assert question.expected == "Biscotti"
    assert question.is_recalled_by("Your dog is called biscotti!")
    assert not question.is_recalled_by("I don't know your dog's name.")


def test_notes_of_other_shapes_and_scripts_still_teach_the_statement():
    examples, heldout = memory_examples(1, "I prefer short answers")
    assert heldout == []
    assert ("What do you remember about me?", "You told me: You prefer short answers.") in {
        (e.prompt, e.answer) for e in examples}
    examples, _ = memory_examples(2, "我的狗叫饼干。")
    assert any(e.answer == "You told me: 我的狗叫饼干。" for e in examples)
    assert memory_examples(3, "   \n ") == ([], [])


@given(st.text(max_size=300))
def test_any_note_gives_well_formed_examples(note):
    examples, heldout = memory_examples(1, note)
    if not note.split():
        assert examples == [] and heldout == []
        return
    assert examples and all(e.prompt.strip() and e.answer.strip() for e in examples)
    # Whatever the script, the note's own words reach the answers (English ones may change
    # person or case: "my" -> "your").
    words = [w for w in note.split() if not any("a" <= c.lower() <= "z" for c in w)]
    assert all(w in examples[0].answer for w in words)


@given(st.text(alphabet=st.characters(blacklist_categories=["Lu", "Ll", "Lt", "Lm", "Lo"]),
               max_size=50))
def test_second_person_leaves_text_without_letters_alone(text):
    assert second_person(text) == text


def test_second_person_swaps_pronouns_keeping_case():
    assert second_person("I'm sure my cat likes me. My mine.") == \
        "You're sure your cat likes you. Your yours."
    assert second_person("Mylar is in the Island") == "Mylar is in the Island"


def reply(message_id, question, text, rating=None, correction=None):
    return TaughtReply(message_id, question, text, rating, correction)


def test_dataset_learns_corrections_and_accepted_replies_deduplicated():
    dataset = build_dataset(
        [(1, "I live in Lisbon"), (2, "i live in lisbon")],
        [reply(10, "Capital of France?", "Paris.", rating=1),
         reply(11, "2+2?", "5", rating=-1, correction="4"),
         reply(12, "Hi", "Hello!", rating=-1),  # thumbs down, not corrected: never learned
         reply(13, "", "orphan", rating=1)])  # no question it answered: nothing to learn
    by_source = dataset.by_source()
    assert [(e.prompt, e.answer) for e in by_source["accepted"]] == [("Capital of France?",
                                                                     "Paris.")]
    assert [(e.prompt, e.answer) for e in by_source["correction"]] == [("2+2?", "4")]
    assert all("Hello!" not in e.answer for e in dataset.examples)
    memory_pairs = [(e.prompt.casefold(), e.answer.casefold()) for e in by_source["memory"]]
    assert len(memory_pairs) == len(set(memory_pairs))  # the two notes differ only in case
    assert len(dataset.heldout) == 2


def test_fingerprint_follows_the_content_not_the_order():
    a = build_dataset([(1, "I live in Lisbon"), (2, "My cat is Tom")], [])
    b = build_dataset([(2, "My cat is Tom"), (1, "I live in Lisbon")], [])
    c = build_dataset([(1, "I live in Porto"), (2, "My cat is Tom")], [])
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_store_gives_the_replies_the_user_taught(store):
    conversation = store.create_conversation()
    store.add_message(conversation, "user", "What is 2+2?")
    wrong = store.add_message(conversation, "assistant", "5")
    store.add_message(conversation, "user", "Name a fruit")
    good = store.add_message(conversation, "assistant", "Apple")
    store.add_message(conversation, "user", "Say hi")
    bad = store.add_message(conversation, "assistant", "Go away")
    store.correct_message(wrong, "4")
    store.rate_message(good, 1)
    store.rate_message(bad, -1)
    taught = {t.message_id: t for t in store.taught_replies()}
    assert set(taught) == {wrong, good}
    assert (taught[wrong].question, taught[wrong].correction) == ("What is 2+2?", "4")
    assert taught[good].question == "Name a fruit"
    store.set_learn(good, False)
    assert {t.message_id for t in store.taught_replies()} == {wrong}
    assert store.message(good).rating == 1  # the rating itself is kept


def test_forgetting_examples_from_the_session(session):
    note = session.remember("My cat is Tom")
    conversation = session.store.create_conversation()
    session.store.add_message(conversation, "user", "Name a fruit")
    answer = session.store.add_message(conversation, "assistant", "Apple")
    session.learning.rate(answer, 1)
    assert {e.source for e in session.learning.dataset().examples} == {"memory", "accepted"}
    session.learning.forget("accepted", answer)
    session.learning.forget("memory", note)
    assert session.learning.dataset().examples == []
    with pytest.raises(FloeError, match="no reply with id"):
        session.learning.rate(conversation * 1000, 1)


# Tiers


@pytest.mark.parametrize(("hardware", "tier", "rank", "mlp"), [
    (Hardware(2, 8, None, False), "small", 4, False),
    (Hardware(4, 16, None, False), "medium", 8, False),
    (Hardware(8, 32, None, False), "large", 16, True),
    (Hardware(4, 16, "mps", False), "large", 16, True),
    (Hardware(16, 64, "cuda", True), "small", 4, False),  # on battery: the lightest
    (Hardware(8, 4, None, False), "small", 4, False),  # little memory
])
def test_hardware_picks_a_tier(hardware, tier, rank, mlp):
    chosen, why = choose_tier(hardware)
    assert (chosen.name, chosen.rank, "down_proj" in chosen.targets) == (tier, rank, mlp)
    assert chosen.threads <= hardware.physical_cores
    assert f"{hardware.physical_cores} cores" in why


def test_tiers_differ_in_size_and_a_setting_overrides_the_probe():
    small, medium, large = (choose_tier(Hardware(16, 64, None, False), name)[0]
                            for name in ("small", "medium", "large"))
    assert small.rank < medium.rank < large.rank
    assert small.max_tokens < medium.max_tokens < large.max_tokens
    assert small.steps_for(1) == small.min_steps and small.steps_for(10_000) == small.max_steps
    assert "set in learning.tier" in choose_tier(Hardware(2, 4, None, False), "large")[1]


def test_battery_is_read_from_sysfs(tmp_path):
    def supply(name, **files):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        for key, value in files.items():
            (folder / key).write_text(value + "\n")

    supply("BAT0", type="Battery", status="Discharging")
    assert _on_battery(tmp_path)
    supply("AC", type="Mains", online="1")
    assert not _on_battery(tmp_path)
    assert not _on_battery(tmp_path / "missing")


# The gate


def test_gate_rejects_a_perplexity_rise_or_a_recall_drop():
    assert gate_reasons(0.02, 0.05, 0.5, 0.5) == []
    assert gate_reasons(-0.01, 0.05, None, None) == []
    [why] = gate_reasons(0.08, 0.05, 0.5, 1.0)
    assert "perplexity rose +8.0%" in why
    [why] = gate_reasons(0.0, 0.05, 1.0, 0.5)
    assert "fell from 100% to 50%" in why
    assert len(gate_reasons(0.5, 0.05, 1.0, 0.0)) == 2


# The registry, with real adapter files applied by llama.cpp


def random_adapter(path, engine, seed=0, scale=0.05, base=None):
    """A rank-2 LoRA on block 0's q and v projections, SmolLM2's real shapes."""
    rng = np.random.default_rng(seed)
    state = {}
    for module, rows in (("q_proj", 576), ("v_proj", 192)):
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        state[f"{key}.lora_A.weight"] = rng.normal(0, scale, (2, 576)).astype(np.float32)
        state[f"{key}.lora_B.weight"] = rng.normal(0, scale, (rows, 2)).astype(np.float32)
    return write_gguf_adapter(path, state, alpha=2.0, base=base or base_model_of(engine.metadata))


@pytest.fixture
def registry(store, tmp_path):
    return Registry(store, tmp_path / "adapters")


def register(registry, engine, tmp_path, seed, status="promoted"):
    staged = random_adapter(tmp_path / f"staged-{seed}.gguf", engine, seed)
    return registry.register(staged, base_model=engine.base_identity, status=status,
                             meta={"seed": seed})


def test_versions_are_checksummed_used_and_rolled_back(registry, engine, tmp_path):
    v1 = register(registry, engine, tmp_path, 1)
    assert v1.version == 1 and registry.active_version() == 1
    assert registry.problem(v1) is None and v1.meta == {"seed": 1}
    assert not (tmp_path / "staged-1.gguf").exists()  # moved in, not copied
    v2 = register(registry, engine, tmp_path, 2, status="rejected")
    assert registry.active_version() == 1  # a rejected version is kept, not used
    registry.use(v2.version)  # ...unless the user asks for it
    assert registry.active_version() == 2
    assert registry.rollback() == 1
    assert registry.rollback() == 0  # back to the base model
    with pytest.raises(FloeError, match="nothing to roll back"):
        registry.rollback()
    with pytest.raises(FloeError, match="no adapter version 9"):
        registry.use(9)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_a_damaged_active_adapter_is_detected_and_the_previous_one_used(
        session, engine, tmp_path, damage):
    registry = session.registry
    v1 = register(registry, engine, tmp_path, 1)
    v2 = register(registry, engine, tmp_path, 2)
    path = Path(v2.path)
    data = bytearray(path.read_bytes())
    if damage == "corrupt":
        data[-100] ^= 0xFF
        path.write_bytes(data)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()
    try:
        notices = session.sync_adapter(engine)
        assert str(engine.adapter_path) == v1.path
    finally:
        engine.set_adapter(None)
    [notice] = notices
    assert f"Adapter v{v2.version} cannot be used" in notice and "Using v1 instead" in notice
    assert {"corrupt": "checksum mismatch", "truncated": "truncated",
            "missing": "missing"}[damage] in notice
    assert registry.store.adapter(v2.version).status == "broken"
    assert registry.active_version() == v1.version


def test_the_chat_picks_up_a_new_version_without_restarting(session, engine, tmp_path):
    try:
        assert session.sync_adapter(engine) == []
        assert engine.adapter_path is None
        v1 = register(session.registry, engine, tmp_path, 1)
        assert session.sync_adapter(engine) == ["Now using adapter v1."]
        assert str(engine.adapter_path) == v1.path
        assert session.sync_adapter(engine) == []  # nothing changed: nothing done
        session.registry.use(0)
        assert session.sync_adapter(engine) == ["Now using the base model without an adapter."]
        assert engine.adapter_path is None
    finally:
        engine.set_adapter(None)


def test_an_adapter_from_another_base_model_is_refused(session, engine, tmp_path):
    info = base_model_of(engine.metadata)
    other = type(info)("Some Other 135M|llama|30|576|9|3", info.arch, info.n_head,
                       info.n_head_kv)
    path = random_adapter(tmp_path / "other.gguf", engine, base=other)
    with pytest.raises(FloeError, match="trained on another base model"):
        engine.set_adapter(path)
    assert engine.adapter_path is None
    # Through the registry: refused, marked broken, the chat goes on with the base model.
    staged = random_adapter(tmp_path / "other2.gguf", engine, base=other)
    row = session.registry.register(staged, base_model=other.identity, status="promoted")
    notices = session.sync_adapter(engine)
    assert engine.adapter_path is None
    assert "trained on another base model" in notices[0] and "the base model" in notices[0]
    assert session.store.adapter(row.version).status == "broken"


def test_switching_adapters_does_not_leak_handles(engine, tmp_path):
    paths = [random_adapter(tmp_path / f"a{i}.gguf", engine, seed=i) for i in range(2)]
    base = engine.next_token_logprobs(engine.chat_tokens([{"role": "user", "content": "Hi"}]))
    try:
        for _ in range(20):  # each switch frees the previous handle
            for path in paths:
                engine.set_adapter(path)
        tuned = engine.next_token_logprobs(engine.chat_tokens([{"role": "user",
                                                                "content": "Hi"}]))
    finally:
        engine.set_adapter(None)
    again = engine.next_token_logprobs(engine.chat_tokens([{"role": "user", "content": "Hi"}]))
    assert not np.allclose(base, tuned, atol=1e-4)
    np.testing.assert_allclose(base, again, atol=1e-5)


def test_disk_full_while_writing_leaves_nothing_behind(engine, tmp_path, monkeypatch, registry):
    import gguf

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "write_tensors_to_file", no_space)
        with pytest.raises(OSError, match="No space left"):
            random_adapter(tmp_path / "full.gguf", engine)
    assert not list(tmp_path.glob("full.gguf*"))  # neither the file nor a partial one
    staged = random_adapter(tmp_path / "staged.gguf", engine)
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", no_space)
        with pytest.raises(FloeError, match="No space left on device; the active version stays"):
            registry.register(staged, base_model=engine.base_identity, status="promoted")
    assert registry.versions() == [] and registry.active_version() == 0
    assert not list((tmp_path / "adapters").glob("*.gguf"))


# The job's signals


def test_a_reply_in_progress_is_visible_to_the_training_job(tmp_path):
    assert not someone_replying(tmp_path)
    with replying(tmp_path):
        assert someone_replying(tmp_path)
    assert not someone_replying(tmp_path)
    # A marker left by a process that died (kill -9) does not pause training forever.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "replying" / dead).touch()
    assert not someone_replying(tmp_path)


def test_one_training_job_at_a_time(tmp_path):
    with training_lock(tmp_path), pytest.raises(FloeError, match="already running"), \
            training_lock(tmp_path):
        pass
    with training_lock(tmp_path):  # released when the holder ends
        pass


# The command line


def test_adapters_and_examples_from_the_command_line(paths, floe_home, store, engine, tmp_path):
    from tests.conftest import run_floe

    assert "No adapters yet" in run_floe("adapters", "list", env_home=floe_home).stdout
    nothing = run_floe("train", env_home=floe_home)
    assert nothing.returncode == 1 and "nothing to learn from yet" in nothing.stderr
    registry = Registry(store, paths.adapters_dir)
    register(registry, engine, tmp_path, 1)
    register(registry, engine, tmp_path, 2, status="rejected")
    listing = run_floe("adapters", "list", env_home=floe_home).stdout.splitlines()
    assert listing[0].startswith("* v1") and "promoted" in listing[0]
    assert listing[1].startswith("  v2") and "rejected" in listing[1]
    assert run_floe("adapters", "use", "2", env_home=floe_home).stdout == "Using v2.\n"
    assert registry.active_version() == 2
    rolled = run_floe("adapters", "rollback", env_home=floe_home)
    assert rolled.stdout == "Rolled back: now using v1.\n" and registry.active_version() == 1
    missing = run_floe("adapters", "use", "7", env_home=floe_home)
    assert missing.returncode == 1 and missing.stderr.strip() == \
        "floe: error: no adapter version 7 (see floe adapters list)"

    assert run_floe("remember", "I live in Lisbon", env_home=floe_home).returncode == 0
    shown = run_floe("examples", env_home=floe_home).stdout
    assert "memory (5)" in shown and "Where do I live? -> You live in Lisbon." in shown
    conversation = store.create_conversation()
    store.add_message(conversation, "user", "2+2?")
    answer = store.add_message(conversation, "assistant", "5")
    assert run_floe("correct", str(answer), "4", env_home=floe_home).returncode == 0
    assert run_floe("rate", str(answer), "down", env_home=floe_home).returncode == 0
    assert (store.message(answer).correction, store.message(answer).rating) == ("4", -1)
    bad = run_floe("rate", "999", "up", env_home=floe_home)
    assert bad.returncode == 1 and "no reply with id 999" in bad.stderr
    config = Config()
    config.learning.paused = True
    write_config(paths, config)
    paused = run_floe("train", env_home=floe_home)
    assert paused.returncode == 1 and "learning is paused" in paused.stderr
    status = run_floe("train", "--status", env_home=floe_home)
    assert status.stdout.startswith("learning is paused")  # what the last attempt said


def test_without_the_train_extra_training_explains_and_is_not_retried(
        session, paths, config, monkeypatch):
    import importlib.util

    from floe_app.engine.local import bundled_model_path
    from floe_app.personalize.job import run_training

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    session.remember("My cat is Tom")
    config.learning.auto = True
    assert session.learning.due()
    with pytest.raises(FloeError, match=r"torch missing\): pipx install 'floe-assistant\[train\]'"):
        run_training(paths, config, bundled_model_path())
    assert session.learning.status().state == "failed"
    assert not session.learning.due()  # not again on the same examples...
    session.remember("I live in Lisbon")
    assert session.learning.due()  # ...but after something new


def test_the_chat_and_the_job_share_one_nothing_new_rule(session, paths, config, engine,
                                                          tmp_path):
    from floe_app.engine.local import bundled_model_path
    from floe_app.personalize.job import run_training

    session.remember("My cat is Tom")
    config.learning.auto = True
    dataset = session.learning.dataset()
    assert not nothing_new(dataset, session.store.adapters()) and session.learning.due()
    staged = random_adapter(tmp_path / "staged.gguf", engine, 1)
    version = session.registry.register(staged, base_model=engine.base_identity,
                                        status="promoted",
                                        meta={"fingerprint": dataset.fingerprint})
    assert nothing_new(dataset, session.store.adapters()) and not session.learning.due()
    result = run_training(paths, config, bundled_model_path())  # before any torch import
    assert result.state == "skipped"
    assert result.message == f"Nothing new to learn since v{version.version}."
    session.remember("I live in Lisbon")
    assert session.learning.due()
