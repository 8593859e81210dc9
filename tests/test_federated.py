"""The device side of federated rounds and the shared adapter in the chat (fast tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from floe_app.config import write_config
from floe_app.engine.local import bundled_model_path
from floe_app.engine.sampling import Sampling
from floe_app.errors import FloeError
from floe_app.federated import client, rounds, service
from floe_app.personalize.export import (
    compose,
    peft_factors,
    peft_state,
    read_gguf_adapter,
    write_gguf_adapter,
)
from floe_app.personalize.trainer import base_model_of
from floe_app.store.db import Store

PLAN = {"round": 2, "rank": 8, "clip-norm": 1.0, "noise-multiplier": 1.0, "steps": 5,
        "learning-rate": 0.002}


def plan_for(engine, **changes):
    record = {**PLAN, "base-model": engine.base_identity, **changes}
    return client.RoundPlan.from_record(record, "127.0.0.1:9092", 7)


def base_of(engine) -> client.LocalBase:
    return client.LocalBase(bundled_model_path(), dict(engine.metadata))


def shared_arrays(engine, rank=8, seed=0, scale=0.0):
    shared = rounds.initial(rounds.model_shapes(engine.metadata), rank, seed)
    rng = np.random.default_rng(seed)
    return {f"{m}.{f}": (x if f == "A" else (x + scale * rng.standard_normal(x.shape)
                                              ).astype(np.float32))
            for m, (b, a) in shared.items() for f, x in (("B", b), ("A", a))}


def opt_in(paths, config, **changes):
    config.federation.enabled = True
    config.federation.address = "127.0.0.1:9092"
    for key, value in changes.items():
        setattr(config.federation, key, value)
    write_config(paths, config)


def teach(store: Store, private: bool = False) -> None:
    conversation = store.create_conversation("glossary")
    if private:
        store.set_conversation_private(conversation, True)
    store.add_message(conversation, "user", "What is a flarn?")
    reply = store.add_message(conversation, "assistant", "I don't know.")
    store.correct_message(reply, "A flarn is a blue gear in an ice mill.")
    store.add_message(conversation, "user", "And a zib?")
    good = store.add_message(conversation, "assistant", "A zib is a small spring.")
    store.rate_message(good, 1)


# Round instructions and what the device checks


@pytest.mark.parametrize("record", [
    {}, dict(PLAN, rank="many"), dict(PLAN, **{"clip-norm": -1.0}),
    dict(PLAN, **{"noise-multiplier": float("nan")}), dict(PLAN, steps=10**6)])
def test_malformed_round_instructions_are_declined(record):
    record = dict(record)
    if record:
        record["base-model"] = "x"
    with pytest.raises(client.Declined, match=r"malformed|out of range"):
        client.RoundPlan.from_record(record, "fed", 1)


def test_a_shared_adapter_is_checked_before_use(engine):
    base, plan = base_of(engine), plan_for(engine)
    good = shared_arrays(engine)
    assert set(client.check_shared(good, plan, base)) == set(
        rounds.model_shapes(engine.metadata))
    nan = dict(good)
    nan["layers.3.self_attn.k_proj.B"] = np.full_like(good["layers.3.self_attn.k_proj.B"],
                                                      np.nan)
    with pytest.raises(client.Declined, match="NaN or infinite"):
        client.check_shared(nan, plan, base)
    with pytest.raises(client.Declined, match="wrong shape"):
        client.check_shared(shared_arrays(engine, rank=4), plan, base)
    with pytest.raises(client.Declined, match="another base model"):
        client.check_shared(good, plan_for(engine, **{"base-model": "gemma|gemma3|18"}), base)


def test_only_what_the_user_shares_is_learned_from(store, config):
    teach(store)
    teach(store, private=True)  # the same lessons in a private conversation: never shared
    store.add_memory("My dog is called Rex.")
    shared = client.shareable(config, store.taught_replies(shareable=True))
    assert sorted(r.correction or r.reply for r in shared) == [
        "A flarn is a blue gear in an ice mill.", "A zib is a small spring."]
    assert len(store.taught_replies()) == 4  # personal learning still uses all of them
    config.federation.share_corrections = False
    assert [r.reply for r in client.shareable(config, store.taught_replies(shareable=True))
            ] == ["A zib is a small spring."]
    config.federation.share_replies = False
    assert client.shareable(config, store.taught_replies(shareable=True)) == []


def test_opted_out_device_uploads_nothing_and_says_why(paths, config, store, engine):
    teach(store)
    write_config(paths, config)  # federation.enabled defaults to false
    with pytest.raises(client.Declined, match="not opted in"):
        client.take_part(paths, Path("unused.gguf"), plan_for(engine), shared_arrays(engine), 4)
    [row] = store.federation_rounds()
    assert row.outcome == "declined" and "not opted in" in row.reason
    assert store.ledger() == []


def test_the_privacy_budget_stops_uploads(paths, config, store, engine):
    teach(store)
    opt_in(paths, config, max_epsilon=8.0)
    for _ in range(2):  # two earlier uploads at z = 1: epsilon 7.1 at delta 1e-5
        store.add_federation_round(federation="f", run_id="1", round_number=1, rank=4,
                                   examples=2, bytes_sent=10, noise_multiplier=1.0,
                                   clip_norm=1.0, outcome="uploaded")
    with pytest.raises(client.Declined, match=r"privacy budget: .* epsilon 9\.\d\d"):
        client.take_part(paths, bundled_model_path(), plan_for(engine), shared_arrays(engine), 4)
    assert store.ledger() == []


def test_a_user_minimum_raises_the_servers_noise(paths, config, store, engine):
    """No training needed to see it: the budget check uses the larger multiplier."""
    teach(store)
    opt_in(paths, config, min_noise_multiplier=50.0, max_epsilon=0.05)
    with pytest.raises(client.Declined, match=r"epsilon 0\.\d\d"):
        client.take_part(paths, bundled_model_path(), plan_for(engine), shared_arrays(engine), 4)


def test_nothing_shareable_is_declined(paths, config, store, engine):
    store.add_memory("My dog is called Rex.")  # memory notes are never shared
    opt_in(paths, config)
    with pytest.raises(client.Declined, match="nothing shareable"):
        client.take_part(paths, bundled_model_path(), plan_for(engine), shared_arrays(engine), 4)


def test_an_upload_is_recorded_in_the_ledger_before_it_leaves(store, engine):
    upload = client.Upload({"layers.0.self_attn.q_proj": np.zeros((576, 8), np.float32)},
                           rank=4, examples=3, epsilon=4.73, noise_multiplier=1.0)
    client.record_upload(store, plan_for(engine), upload)
    [entry] = store.ledger()
    assert entry.purpose == "federated" and entry.bytes_sent == 576 * 8 * 4
    assert entry.text_sent.startswith("no text:") and "epsilon now 4.73" in entry.text_sent
    [row] = store.federation_rounds()
    assert (row.outcome, row.epsilon, row.rank) == ("uploaded", 4.73, 4)


# The shared adapter in the chat: composed with the personal one


def factors_adapter(path, engine, factors, alpha):
    return write_gguf_adapter(path, peft_state(factors), alpha=alpha,
                              base=base_model_of(engine.metadata))


def small_factors(seed, rank=2, scale=0.05, sign=1.0):
    rng = np.random.default_rng(seed)
    return {f"layers.{i}.self_attn.{m}": (sign * rng.normal(0, scale, (rows, rank)),
                                          rng.normal(0, scale, (rank, 576)))
            for i in (0, 5) for m, rows in (("q_proj", 576), ("v_proj", 192))}


def next_token_logits(engine, prompt="The capital of France is"):
    return np.array(engine.next_token_logprobs(
        engine.chat_tokens([{"role": "user", "content": prompt}])))


def test_composition_is_exact_in_llama_cpp(engine, tmp_path):
    """An adapter stacked with its own negation leaves the base model exactly."""
    base = next_token_logits(engine)
    mine = factors_adapter(tmp_path / "p.gguf", engine, small_factors(1), alpha=4.0)
    # The negation at another alpha: scales must be folded right for the two to cancel.
    negated = {m: (-b * 2.0, a) for m, (b, a) in small_factors(1).items()}
    other = factors_adapter(tmp_path / "n.gguf", engine, negated, alpha=2.0)
    both = compose([read_gguf_adapter(mine), read_gguf_adapter(other)])
    assert both["blk.0.attn_q.weight.lora_b"].shape == (576, 4)
    from floe_app.personalize.export import BaseModel, write_gguf_tensors

    info = base_model_of(engine.metadata)
    path = write_gguf_tensors(tmp_path / "c.gguf", both, alpha=0.0,
                              base=BaseModel(info.identity, info.arch, 0, 0))
    try:
        engine.set_adapter(mine)
        alone = next_token_logits(engine)
        engine.set_adapter(path)
        cancelled = next_token_logits(engine)
    finally:
        engine.set_adapter(None)
    assert np.abs(alone - base).max() > 0.05  # the adapter does something...
    assert np.abs(cancelled - base).max() < 1e-3  # ...and its negation undoes it exactly


def test_peft_factors_round_trip():
    factors = small_factors(3)
    back = peft_factors(peft_state(factors))
    assert back.keys() == factors.keys()
    for module, (b, a) in factors.items():
        np.testing.assert_allclose(back[module][0], b, rtol=1e-6)
        np.testing.assert_allclose(back[module][1], a, rtol=1e-6)


def install(session, engine, tmp_path, seed=4):
    shared = rounds.initial(rounds.model_shapes(engine.metadata), 8, seed)
    rng = np.random.default_rng(seed)
    shared = {m: ((0.05 * rng.standard_normal(b.shape)).astype(np.float32), a)
              for m, (b, a) in shared.items()}
    plan = plan_for(engine)
    return client.install_shared(session.paths, session.store, shared, plan, 4,
                                  base_of(engine), perplexity_margin=1.0)


def test_the_chat_composes_personal_and_shared_adapters(session, engine, tmp_path):
    from tests.test_learning import register

    try:
        assert session.sync_adapter(engine) == []  # the first sync is silent
        shared_path = install(session, engine, tmp_path)
        assert session.sync_adapter(engine) == ["Now using the shared adapter (round 2)."]
        assert engine.adapter_path == shared_path
        v1 = register(session.registry, engine, tmp_path, 1)
        assert session.sync_adapter(engine) == [
            f"Now using adapter v{v1.version} with the shared adapter (round 2)."]
        composed = engine.adapter_path
        assert composed.name.startswith("composed-") and composed.parent == Path(v1.path).parent
        tensors = read_gguf_adapter(composed).tensors
        assert tensors["blk.0.attn_q.weight.lora_b"].shape == (576, 2 + 4)  # ranks stacked
        assert tensors["blk.7.attn_k.weight.lora_b"].shape == (192, 4)  # shared only here
        reply = "".join(s.text for s in engine.generate(
            engine.chat_tokens([{"role": "user", "content": "Hi"}]),
            Sampling(temperature=0, max_tokens=4)))
        assert reply
    finally:
        engine.set_adapter(None)


def test_a_damaged_shared_adapter_is_left_out_with_a_notice(session, engine, tmp_path):
    from tests.test_learning import register

    try:
        v1 = register(session.registry, engine, tmp_path, 1)
        shared_path = install(session, engine, tmp_path)
        data = bytearray(shared_path.read_bytes())
        data[-50] ^= 0xFF
        shared_path.write_bytes(data)
        notices = session.sync_adapter(engine)
        assert str(engine.adapter_path) == v1.path  # the personal adapter alone
        assert notices == ["The shared adapter cannot be used: its file is corrupt"
                           " (checksum mismatch)."]
        assert session.sync_adapter(engine) == []  # said once, not at every reply
    finally:
        engine.set_adapter(None)


# The sync service's command line


def test_sync_refuses_what_would_expose_updates(paths, config):
    with pytest.raises(FloeError, match="opt in first"):
        service.supernode_command(paths, config, 4, 9999)
    config.federation.enabled = True
    with pytest.raises(FloeError, match="no federation address"):
        service.supernode_command(paths, config, 4, 9999)
    config.federation.address = "federation.example.org:9092"
    with pytest.raises(FloeError, match="TLS certificate"):
        service.supernode_command(paths, config, 4, 9999)
    config.federation.root_certificates = "~/ca.pem"
    config.federation.node_key = "~/node.key"
    command = service.supernode_command(paths, config, 8, 9999)
    assert "--insecure" not in command
    assert command[command.index("--root-certificates") + 1].endswith("/ca.pem")
    assert "--auth-supernode-private-key" in command
    assert "rank=8" in command[command.index("--node-config") + 1]
    config.federation.address, config.federation.root_certificates = "127.0.0.1:9092", ""
    config.federation.node_key = ""  # (a device key needs TLS: the next test)
    assert "--insecure" in service.supernode_command(paths, config, 4, 9999)


def test_sync_status_when_nothing_ran(paths, capsys):
    from floe_app.cli import main

    assert main(["sync", "status"]) == 0
    out = capsys.readouterr().out
    assert "not running" in out and "epsilon 0.00" in out
    assert main(["sync", "stop"]) == 0
    assert "not running" in capsys.readouterr().out
    assert main(["sync", "start"]) == 1
    assert "opt in first" in capsys.readouterr().err


def test_a_killed_service_its_parent_has_not_reaped_is_not_running():
    """After kill -9 the sync service is a zombie until init reaps it (1.5 s on some
    machines): `floe sync start` must not take it for a running one."""
    from floe_app.store.db import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
        child.kill()
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # killed, not reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not pid_alive(child.pid)
    finally:
        child.wait()


def test_device_keys_need_tls_and_serve_says_what_flower_would_refuse(paths, config):
    config.federation.enabled = True
    config.federation.address = "127.0.0.1:9092"
    config.federation.node_key = "~/node_key"
    with pytest.raises(FloeError, match="node_key needs TLS"):
        service.supernode_command(paths, config, 4, 9999)
    options = service.ServeOptions(paths.data_dir / "federation", {}, supernode_auth=True)
    assert "--supernode-auth needs TLS" in service.superlink_problem(options)
    options.ssl_certfile = "server.pem"
    assert "all three" in service.superlink_problem(options)
    options.ssl_keyfile, options.ssl_ca_certfile = "server.key", "ca.pem"
    assert service.superlink_problem(options) is None
    with pytest.raises(FloeError, match="no federation served from"):
        service.register_device(paths.data_dir / "federation", Path("key.pub"))


def test_a_device_key_is_private_and_in_the_form_flower_reads(paths, capsys):
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    from floe_app.cli import main
    from floe_app.config import load_config

    previous = os.umask(0)  # whatever the umask, the private key is the user's alone
    try:
        private, public = service.make_node_key(paths)
    finally:
        os.umask(previous)
    assert private.stat().st_mode & 0o777 == 0o600
    key = load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode loads it
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == \
        key.public_key().public_numbers()  # as flwr supernode register loads it
    made = private.read_bytes()
    assert main(["sync", "key"]) == 0  # created once: the registered key stays valid
    assert private.read_bytes() == made
    assert load_config(paths)[0].federation.node_key == str(private)
    assert str(public) in capsys.readouterr().out


def test_private_conversations_from_the_command_line(paths, store, config, capsys):
    from floe_app.cli import main

    teach(store)
    [conversation] = store.conversations()
    assert main(["private", str(conversation.id)]) == 0
    assert "private: no federation learns from it" in capsys.readouterr().out
    assert store.conversation(conversation.id).private == 1
    assert client.shareable(config, store.taught_replies(shareable=True)) == []
    assert main(["private", str(conversation.id), "off"]) == 0
    assert len(client.shareable(config, store.taught_replies(shareable=True))) == 2
    assert main(["private", "999"]) == 1
    assert "no conversation 999" in capsys.readouterr().err


def test_a_shared_adapter_that_harms_general_text_is_refused(session, engine):
    """What DP noise in a small federation produces: refused, nothing kept."""
    shared = rounds.initial(rounds.model_shapes(engine.metadata), 8, 5)
    rng = np.random.default_rng(5)
    noisy = {m: ((0.5 * rng.standard_normal(b.shape)).astype(np.float32), a)
             for m, (b, a) in shared.items()}
    with pytest.raises(client.Declined, match=r"perplexity rose \+\d+.*limit \+5%"):
        client.install_shared(session.paths, session.store, noisy, plan_for(engine), 8,
                              base_of(engine), perplexity_margin=0.05)
    assert session.store.shared_adapters() == []
    assert list((session.paths.data_dir / "shared").iterdir()) == []


# Privacy: what a device accepts, the statement it shows, the server's check


def policy_of(mode, **changes):
    from floe_app.federated import privacy

    chosen = privacy.choose(mode, expected_nodes=3, rounds=2, coordinates=737_280,
                            clip_norm=1.0, target_epsilon=8.0, delta=1e-5,
                            noise_multiplier=None if mode in ("auto", "none") else 1.0)
    return privacy.Policy(**{**chosen.__dict__, **changes})


def test_a_device_accepts_what_its_settings_allow(config):
    auto, central, local = policy_of("auto"), policy_of("central"), policy_of("local")
    federation = config.federation
    assert (federation.require, federation.min_noise_multiplier) == ("any", 0.0)  # defaults
    assert all(client.policy_problem(p, federation) is None for p in (auto, central, local))
    federation.require = "formal_dp"
    assert "adds no DP noise" in client.policy_problem(auto, federation)
    assert client.policy_problem(central, federation) is None
    federation.require = "local_dp"
    assert "add the noise themselves" in client.policy_problem(central, federation)
    assert client.policy_problem(local, federation) is None
    federation.require = "secure_aggregation"  # declined where the operator sees updates
    assert all("no secure aggregation" in client.policy_problem(p, federation)
               for p in (auto, central, local))
    assert client.policy_problem(policy_of("auto", secure_aggregation=True),
                                 federation) is None
    federation.require, federation.min_noise_multiplier = "any", 2.0
    assert "x0 (none)" in client.policy_problem(auto, federation)
    assert "x1" in client.policy_problem(central, federation)
    assert client.policy_problem(local, federation) is None  # this device adds 2 itself


def test_a_declined_federation_says_why_and_status_shows_its_privacy(paths, config, store,
                                                                     engine, capsys):
    from floe_app.cli import main

    teach(store)
    opt_in(paths, config, require="formal_dp")
    record = {**PLAN, "base-model": engine.base_identity, **policy_of("auto").record()}
    plan = client.RoundPlan.from_record(record, "127.0.0.1:9092", 7)
    assert plan.policy.mode == "none"
    with pytest.raises(client.Declined, match=r"privacy settings: federation\.require"):
        client.take_part(paths, bundled_model_path(), plan, shared_arrays(engine), 4)
    [row] = store.federation_rounds()
    assert row.outcome == "declined" and "formal_dp" in row.reason
    assert store.ledger() == []
    assert main(["sync", "status"]) == 0
    out = capsys.readouterr().out
    assert "Privacy in 127.0.0.1:9092: Each round this device sends" in out
    assert "No formal guarantee: this federation is too small for one" in out
    # A server that announced secure aggregation gets no unmasked update (the SecAgg+ mod
    # on this device masks only what reaches the handler through it).
    opt_in(paths, config, require="any")
    secure = {**record, **policy_of("auto", secure_aggregation=True).record()}
    plan = client.RoundPlan.from_record(secure, "127.0.0.1:9092", 7)
    with pytest.raises(client.Declined, match="announced secure aggregation but asked for an"
                                              " unmasked update"):
        client.take_part(paths, bundled_model_path(), plan, shared_arrays(engine), 4)
    assert store.ledger() == []


def test_uploads_without_noise_spend_no_budget_and_say_so(paths, config, store, engine):
    upload = client.Upload({"layers.0.self_attn.q_proj": np.zeros((576, 4), np.float32)},
                           rank=4, examples=3, epsilon=None, noise_multiplier=0.0,
                           mode="none", release_noise=0.0)
    for _ in range(30):  # no DP release: the budget (max_epsilon) is never reached
        client.record_upload(store, plan_for(engine), upload)
    assert client.spent_multipliers(store) == []
    assert "no DP noise" in store.ledger()[0].text_sent
    assert "no formal DP guarantee" in store.ledger()[0].text_sent
    central = client.Upload(upload.delta, 4, 3, 2.5, 0.0, "central", 0.9)
    client.record_upload(store, plan_for(engine), central)
    assert client.spent_multipliers(store) == [0.9]
    assert "the server adds x0.9 to the round's sum" in store.ledger()[0].text_sent  # newest
    lines = service.sync_summary(paths).lines(1e-5)
    assert "epsilon 2.50" in lines[1] and "30 uploads without DP noise" in lines[1]


def federation_server(tmp_path, mode, noise=-1.0):
    from floe_app.federated import server_app

    settings = server_app.Settings(
        rounds=2, rank=8, clip_norm=1.0, noise_multiplier=noise, steps=1, learning_rate=0.01,
        min_nodes=3, round_timeout=1.0, state_dir=tmp_path / "state",
        model=str(bundled_model_path()), privacy=mode, secure_aggregation=mode != "central")
    return server_app.Federation(settings)


def updates_for(server, scale, rank=8, seed=0):
    rng = np.random.default_rng(seed)
    return {str(i): ({m: (scale * rng.standard_normal((out, rank))).astype(np.float32)
                      for m, (out, _) in server.shapes.items()}, rank, 2, 0.0)
            for i in range(3)}


def test_under_secure_aggregation_the_server_aggregates_the_sum_it_alone_sees(tmp_path,
                                                                            monkeypatch):
    """Through the real protocol (Flower's SecAgg+ mod on in-process devices): without
    noise, FlexLoRA with every device counted once; under distributed DP, B plus the sum
    over the expected number of devices (fixed denominator)."""
    from flwr.supercore.task_identity import TaskIdentity

    from tests.support.secagg_devices import Devices, as_server_process

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, None)
    as_server_process()
    for mode in ("none", "distributed"):
        server = federation_server(tmp_path / mode, mode, noise=0.5)
        assert server.policy.secure_aggregation and server.policy.mode == mode
        updates = {int(n): (d, r) for n, (d, r, _, _) in updates_for(server, 0.002).items()}
        updates[1] = ({m: d[:, :4] for m, d in updates[1][0].items()}, 4)
        padded = {n: {m: np.pad(d, ((0, 0), (0, 8 - r))) for m, d in delta.items()}
                  for n, (delta, r) in updates.items()}
        devices = Devices({n: [p[m] for m in sorted(p)] for n, p in padded.items()},
                          {n: r for n, (_, r) in updates.items()})
        gathered = server.secure_updates(devices, 1, sorted(padded))
        assert sorted(gathered.ranks) == [4, 8] and gathered.problem is None
        assert set(gathered.log["accepted"]) == {"0", "1", "2"}
        if mode == "none":
            expected = rounds.mean_b(server.shared, [(d, r, 1) for d, r in updates.values()])
        else:
            expected = {m: b + sum(p[m] for p in padded.values()) / 3
                        for m, (b, _) in server.shared.items()}
        for module, b in gathered.target.items():
            np.testing.assert_allclose(b, expected[module], atol=1e-5)


@pytest.mark.timeout(900)
def test_the_server_publishes_only_what_devices_would_keep(tmp_path):
    # A sane round: published, and the perplexity it measured is logged.
    server = federation_server(tmp_path, "none")
    assert server.policy.mode == "none" and server.policy.reason.startswith("the operator")
    before = server.shared
    outcome = server.combine(1, *server.plain_target(updates_for(server, 0.002)))
    assert outcome["published"] and outcome["withheld"] is None
    assert abs(outcome["perplexity_rise"]["8"]) < 0.05
    assert server.shared is not before
    # A change too large for the devices' gate at full size (+33% measured): the server
    # moves only part of the way, as far as their gate accepts.
    before = server.shared
    outcome = server.combine(2, *server.plain_target(updates_for(server, 0.3, seed=1)))
    assert outcome["published"] and outcome["step"] < 1
    assert f"moved {outcome['step']:g} of the way" in service.describe(
        {"event": "round", "round": 2, "nodes": 3, "accepted": {}, "refused": {},
         "declined": {}, "seconds": 1.0, "version": "v", **outcome})
    assert outcome["perplexity_rise"]["8"] <= 0.05
    full = rounds.toward(before, rounds.mean_b(before, [
        (d, r, e) for d, r, e, _ in updates_for(server, 0.3, seed=1).values()]))
    assert rounds.change_norm(before, server.shared) == pytest.approx(
        outcome["step"] * rounds.change_norm(before, full), rel=1e-3)
    # Changes (honest in norm, as no noise is involved) that wreck general text even an
    # eighth of the way: withheld.
    kept = server.shared
    outcome = server.combine(3, *server.plain_target(updates_for(server, 4.0, seed=1)))
    assert not outcome["published"] and outcome["perplexity_rise"]["8"] > 0.05
    assert "perplexity would rise" in outcome["withheld"] and "0.125 of the way" in outcome[
        "withheld"]
    assert server.shared is kept  # unchanged: no device is sent what it would refuse
    # Central DP at noise x1 among 3 devices: the noise dominates, caught by the norm.
    server = federation_server(tmp_path / "central", "central", noise=1.0)
    before = server.shared
    outcome = server.combine(1, *server.plain_target(updates_for(server, 0.002)))
    assert not outcome["published"] and "DP noise x1.00 on 3 devices" in outcome["withheld"]
    assert outcome["change_norm"] > 100 * outcome["norm_bound"] / 2
    assert server.shared is before
    # The round log says so in words.
    line = service.describe({"event": "round", "round": 1, "nodes": 3, "accepted": {},
                             "refused": {}, "declined": {}, "seconds": 1.0,
                             "version": "v", **outcome})
    assert "shared adapter unchanged, not published: the aggregate changes" in line


def test_serve_refuses_dp_its_aggregation_cannot_give_and_status_json_has_the_privacy(
        paths, capsys):
    import json

    from floe_app.cli import main

    assert main(["federation", "serve", "--privacy", "distributed",
                 "--secure-aggregation", "off"]) == 2
    assert "needs secure aggregation" in capsys.readouterr().err
    assert main(["federation", "serve", "--privacy", "central"]) == 2
    assert "which secure aggregation hides" in capsys.readouterr().err
    assert main(["sync", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["privacy"].startswith("Privacy: no federation round received yet")
    assert status["policy"] is None
