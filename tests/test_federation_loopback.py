"""A real federation on loopback: `floe federation serve` (a Flower SuperLink and Floe's
ServerApp) and devices started with `floe sync start` (Flower SuperNodes running Floe's
ClientApp). Without secure aggregation: three honest devices at ranks 4, 8 and 16 (the
small, medium and large tiers) and one tampered, two rounds, the SuperLink killed and
restarted between them, one device opting out, every upload of one device read back from
the wire. With it (the default): one device failing mid-round, and what reaches the
SuperLink is masked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from floe_app.config import Config, load_config, write_config
from floe_app.engine.sampling import Sampling
from floe_app.federated.service import free_port
from floe_app.paths import resolve_paths
from floe_app.personalize.export import read_gguf_adapter
from floe_app.session import ChatSession
from floe_app.store import Store
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.slow

# Each device knows one term of a shared glossary (taught by correcting a reply) and one
# personal fact (a memory note, never shared).
GLOSSARY = [("What is a flarn?", "A flarn is a blue gear used in ice mills."),
            ("What is a zibble?", "A zibble is a copper spring for clocks."),
            ("What is a quendle?", "A quendle is a glass valve for steam pipes.")]
PERSONAL = ["My dog is called Rexor.", "My cat is called Tomble.", "My bird is called Kiwa."]
TIERS = ["small", "medium", "large"]

# A tampered install: its ClientApp sends NaN in round 1 and a huge update in round 2.
TAMPERED = '''
import numpy as np
import floe_app.federated.client as client

def take_part(paths, model_path, plan, shared_arrays, node_rank, masked=False):
    fill = np.nan if plan.round == 1 else 1e4
    delta = {m[:-2]: np.full((a.shape[0], 4), fill, np.float32)
             for m, a in shared_arrays.items() if m.endswith(".B")}
    return client.Upload(delta, 4, 1000, 0.0, plan.noise_multiplier)

client.take_part = take_part
'''


def patched(folder: Path, code: str) -> dict:
    """The environment of a device whose Floe runs `code` at start-up (a sitecustomize in
    `folder`), in every process it starts."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return dict(os.environ, PYTHONPATH=str(folder))


def run_floe(home: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "floe_app", *args],
                            env=dict(env or os.environ, FLOE_HOME=str(home)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def floe(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    process = run_floe(home, *args, env=env)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def device(root: Path, name: str, address: str, base_cache: Path, tier: str = "small",
           lesson: tuple[str, str] | None = None, fact: str | None = None) -> Path:
    home = root / name
    paths = resolve_paths({"FLOE_HOME": str(home)}).ensure()
    (paths.cache_dir / "base").symlink_to(base_cache / "base")  # dequantized once per run
    config = Config()
    config.learning.auto = False
    config.learning.tier = tier
    config.learning.threads = 1  # four devices share two cores here
    config.federation.enabled = True
    config.federation.address = address
    # federation.require, min_noise_multiplier, max_epsilon: the defaults a team gets.
    write_config(paths, config)
    store = Store(paths.database)
    if lesson is not None:
        conversation = store.create_conversation("glossary")
        store.add_message(conversation, "user", lesson[0])
        reply = store.add_message(conversation, "assistant", "I am not sure.")
        store.correct_message(reply, lesson[1])
    if fact is not None:
        store.add_memory(fact)
    store.close()
    return home


def wait_for(predicate, timeout: float, what: str, serve: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if serve.poll() is not None:
            raise AssertionError(f"floe federation serve exited: {serve.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def rounds_logged(state: Path) -> list[dict]:
    log = state / "rounds.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.timeout(1200)
def test_three_devices_two_rounds_a_tampered_one_a_restart_and_an_opt_out(
        tmp_path, base_cache, engine):
    from floe_app.engine.local import bundled_model_path
    from floe_app.personalize.trainer import load_base

    load_base(bundled_model_path(), base_cache)  # dequantized once, before four devices need it
    port = free_port()
    proxy = FaultProxy("127.0.0.1", port)  # device 1 talks through it; it keeps what it sends
    address = f"127.0.0.1:{port}"
    homes = [device(tmp_path, f"device{i + 1}", f"127.0.0.1:{proxy.port}" if i == 0
                    else address, base_cache, TIERS[i], GLOSSARY[i], PERSONAL[i])
             for i in range(3)]
    evil_env = patched(tmp_path / "tampered", TAMPERED)
    evil = device(tmp_path, "tampered", address, base_cache)
    state = tmp_path / "operator" / "federation"
    serve_args = ["federation", "serve", "--port", str(port), "--state-dir", str(state),
                  "--rounds", "2", "--rank", "16", "--steps", "6", "--learning-rate", "0.01",
                  "--clip-norm", "10", "--min-nodes", "4", "--round-timeout", "400",
                  "--secure-aggregation", "off"]
    # --privacy auto (the default): four devices cannot bear DP noise, so none is added,
    # and the server says so, to the operator and to every device. Without secure
    # aggregation the server sees, checks and refuses single updates.
    serve = run_floe(tmp_path / "operator", *serve_args)
    try:
        wait_for(lambda: (state / "superlink.pid").exists(), 60, "the SuperLink", serve)
        for home in [*homes, evil]:
            started = floe(home, "sync", "start", env=evil_env if home == evil else None)
            assert started.returncode == 0, started.stderr
            assert "Sync started" in started.stdout
        sync_pids = [json.loads((h / "data" / "sync.json").read_text())["pid"] for h in homes]

        # Round 1, then the SuperLink dies.
        wait_for(lambda: any(e["event"] == "round" for e in rounds_logged(state)), 400,
                 "round 1", serve)
        os.killpg(int((state / "superlink.pid").read_text()), signal.SIGKILL)
        out, err = serve.communicate(timeout=60)
        assert serve.returncode == 1 and "the SuperLink stopped" in err
        assert "round 1: 4 nodes, 3 updates aggregated" in out
        assert "privacy: no DP noise, no secure aggregation; auto: no DP noise (epsilon 7.99" \
            in out
        assert "No formal guarantee: this federation is too small for one" in out

        # Device 3 opts out while the federation is down; everything else carries on.
        paths3 = resolve_paths({"FLOE_HOME": str(homes[2])})
        config3, _ = load_config(paths3)
        config3.federation.enabled = False
        write_config(paths3, config3)
        opted_out_at = time.time()
        serve = run_floe(tmp_path / "operator", *serve_args)
        out, err = serve.communicate(timeout=500)
        assert serve.returncode == 0, err
        assert "round 2: 4 nodes, 2 updates aggregated" in out
        assert "final shared adapter (round 2) sent to 4 nodes" in out
        assert all(floe(h, "sync", "status").stdout.startswith(f"Sync: running (pid {pid})")
                   for h, pid in zip(homes, sync_pids, strict=True))  # the same processes
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)
            serve.communicate(timeout=30)
        for home in [*homes, evil]:
            floe(home, "sync", "stop")
        proxy.close()

    first, second, final = [e for e in rounds_logged(state) if e["event"] != "privacy"]
    assert first["published"] and second["published"] and first["privacy"] == "none"
    assert sorted(u["rank"] for u in first["accepted"].values()) == [4, 8, 16]
    [why] = first["refused"].values()
    assert "NaN" in why
    assert sorted(u["rank"] for u in second["accepted"].values()) == [4, 8]
    [why] = second["refused"].values()
    assert "norm" in why
    [why] = second["declined"].values()
    assert "not opted in" in why
    assert final["installed"] == 4  # receiving is not uploading: the opted-out device keeps it

    saved = json.loads((state / "state.json").read_text())
    assert saved["round"] == 2
    final_arrays = np.load(state / saved["file"])
    uploads = []
    for home, rank in zip(homes, (4, 8, 16), strict=True):
        store = Store(home / "data" / "floe.db")
        # Each device keeps the final shared adapter, cut to its own rank.
        kept = read_gguf_adapter(Path(store.shared_adapters()[-1].path)).tensors
        np.testing.assert_allclose(kept["blk.0.attn_v.weight.lora_b"],
                                   final_arrays["layers.0.self_attn.v_proj.B"][:, :rank])
        np.testing.assert_allclose(kept["blk.0.attn_v.weight.lora_a"],
                                   final_arrays["layers.0.self_attn.v_proj.A"][:rank])
        ledger = [e for e in store.ledger() if e.purpose == "federated"]
        uploads.append(ledger)
        # Round 2 of the killed run may have trained (and been recorded) before the kill.
        assert 1 <= len(ledger) <= 3
        assert all(e.text_sent.startswith("no text:") for e in ledger)
        store.close()
    assert len(uploads[0]) >= 2 and len(uploads[1]) >= 2
    # Opting out stopped device 3's uploads at once.
    assert all(datetime.fromisoformat(e.created_at).timestamp() < opted_out_at
               for e in uploads[2])

    # Every device shows the federation's privacy, as the server decided it.
    for home in homes:
        status = floe(home, "sync", "status").stdout
        assert "Privacy in 127.0.0.1:" in status
        assert "No formal guarantee: this federation is too small for one" in status
        assert "uploads without DP noise: no formal guarantee for them" in status

    # What device 1 sent, read off the wire: tensors and counts, never text.
    check_wire(proxy, uploads[0], texts=[*GLOSSARY[0], PERSONAL[0], "Rexor", "flarn"])

    # Every device ends with a valid shared adapter in llama.cpp, composed with a personal
    # one where there is one, and knows more of the glossary, including what it never saw.
    from tests.test_learning import register

    for i, home in enumerate(homes):
        paths = resolve_paths({"FLOE_HOME": str(home)})
        store = Store(paths.database)
        config, _ = load_config(paths)
        session = ChatSession(store, config, paths=paths)
        try:
            before = [engine.answer_logprob(q, a) for q, a in GLOSSARY]
            session.sync_adapter(engine)
            assert engine.adapter_path is not None
            assert engine.adapter_path.name.startswith("shared-")
            after = [engine.answer_logprob(q, a) for q, a in GLOSSARY]
            gains = np.array(after) - np.array(before)
            others = [g for j, g in enumerate(gains) if j != i]
            assert min(others) > 0, f"device {i + 1}: glossary gains {gains}"
            # Personal facts stay personal: another device's pet is no likelier than before.
            if i == 0:
                engine.set_adapter(None)
                pet_before = engine.answer_logprob("What is my cat called?", "Tomble")
                session.sync_adapter(engine)
                pet_after = engine.answer_logprob("What is my cat called?", "Tomble")
                assert pet_after - pet_before < 0.5 * min(others)
                register(session.registry, engine, tmp_path, 1)
                session.sync_adapter(engine)
                assert engine.adapter_path.name.startswith("composed-")
                reply = "".join(step.text for step in engine.generate(
                    engine.chat_tokens([{"role": "user", "content": "What is a quendle?"}]),
                    Sampling(temperature=0, max_tokens=12)))
                assert reply.strip()
        finally:
            engine.set_adapter(None)
            store.close()


def check_wire(proxy: FaultProxy, ledger: list, texts: list[str]) -> None:
    replies = pushed(proxy, texts, {"Message", "RecordDict", "ArrayRecord", "Array",
                                    "ArrayChunk", "MetricRecord"}, "RecordDict")
    floats, uploads = 0, [r for r in replies if "update" in r]
    for reply in replies:
        if "update" not in reply:  # the reply to the final adapter: one count
            assert set(reply) == {"metrics"} and set(reply["metrics"]) == {"installed"}
            continue
        assert set(reply) == {"update", "metrics"}
        assert set(reply["metrics"]) == {"rank", "examples", "noise-multiplier"}
        assert reply["metrics"]["rank"] == 4
        for array in reply["update"].values():
            values = array.numpy()
            assert values.dtype == np.float32 and values.shape[1] == 4
            floats += values.size
    # Every upload that reached the wire is in the ledger, float for float (one recorded
    # just before the SuperLink was killed may not have left).
    assert 2 <= len(uploads) <= len(ledger)
    assert floats * 4 == len(uploads) * ledger[0].bytes_sent


# A device whose Floe fails after it joined the key exchange: SecAgg+ must finish without it.
FAILING = """
import floe_app.federated.client as client

def take_part(*args, **kwargs):
    raise RuntimeError("this laptop's Floe crashed mid-round")

client.take_part = take_part
"""


@pytest.mark.timeout(900)
def test_secure_aggregation_on_loopback_masks_every_upload_and_survives_a_failing_device(
        tmp_path, base_cache):
    from floe_app.engine.local import bundled_model_path
    from floe_app.personalize.trainer import load_base

    load_base(bundled_model_path(), base_cache)
    port = free_port()
    proxy = FaultProxy("127.0.0.1", port)  # device 1 talks through it
    address = f"127.0.0.1:{port}"
    homes = [device(tmp_path, f"device{i + 1}", f"127.0.0.1:{proxy.port}" if i == 0
                    else address, base_cache, TIERS[i], GLOSSARY[i], PERSONAL[i])
             for i in range(2)]
    failing_env = patched(tmp_path / "failing", FAILING)
    failing = device(tmp_path, "failing", address, base_cache, "large", GLOSSARY[2],
                     PERSONAL[2])
    state = tmp_path / "operator" / "federation"
    serve = run_floe(tmp_path / "operator", "federation", "serve", "--port", str(port),
                     "--state-dir", str(state), "--rounds", "1", "--rank", "8", "--steps", "2",
                     "--learning-rate", "0.01", "--clip-norm", "10", "--min-nodes", "3",
                     "--round-timeout", "300")
    try:
        wait_for(lambda: (state / "superlink.pid").exists(), 60, "the SuperLink", serve)
        for home in [*homes, failing]:
            started = floe(home, "sync", "start", env=failing_env if home == failing else None)
            assert started.returncode == 0, started.stderr
        out, err = serve.communicate(timeout=600)
        assert serve.returncode == 0, err
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)
            serve.communicate(timeout=30)
        for home in [*homes, failing]:
            floe(home, "sync", "stop")
        proxy.close()

    assert "secure aggregation (the server sees only each round's sum)" in out
    assert "round 1: 3 nodes, 2 updates aggregated (ranks 4, 8)" in out
    assert "this laptop's Floe crashed mid-round" in out  # the failing device's error
    [round_entry] = [e for e in rounds_logged(state) if e["event"] == "round"]
    assert round_entry["secure_aggregation"] and round_entry["published"]
    assert len(round_entry["declined"]) == 1
    assert "norm" not in str(round_entry["accepted"])  # the server never saw one update
    # What device 1 sent: keys, encrypted shares and one masked vector; no float of its
    # update, no word of its text.
    store = Store(homes[0] / "data" / "floe.db")
    [upload] = [e for e in store.ledger() if e.purpose == "federated"]
    assert "masked by secure aggregation" in upload.text_sent
    store.close()
    check_masked_wire(proxy, upload, texts=[*GLOSSARY[0], PERSONAL[0], "Rexor", "flarn"])
    for home in homes:
        status = floe(home, "sync", "status").stdout
        assert "sees only the sum of a round's changes from at least 2 devices" in status


def check_masked_wire(proxy: FaultProxy, ledger_entry, texts: list[str]) -> None:
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    # No Array (float tensors) at all: records of keys, shares, counts and the masked
    # vector. (Records another device pushed first, e.g. an equal status, are not re-sent.)
    configs = pushed(proxy, texts, {"Message", "RecordDict", "ArrayRecord", "MetricRecord",
                                    "ConfigRecord"}, "ConfigRecord")
    [masked] = [c[Key.MASKED_PARAMETERS] for c in configs if Key.MASKED_PARAMETERS in c]
    vector = [bytes_to_ndarray(b) for b in masked]
    values = np.concatenate([v.ravel() for v in vector[1:]])
    assert values.dtype == np.int64 and len(values) == 46_080 * 8  # padded to rank 8
    # A quantized update sits near the middle of [0, 2^22); masked, it fills [0, 2^32).
    assert values.min() >= 0 and values.max() < 1 << 32
    assert np.mean(values > 1 << 31) == pytest.approx(0.5, abs=0.01)
    # The ledger counted what left: 8 bytes a number, the count in it.
    assert ledger_entry.bytes_sent == (len(values) + 1) * 8
    assert f"{len(values):,} numbers" in ledger_entry.text_sent


def pushed(proxy: FaultProxy, texts: list[str], kinds_allowed: set[str], kind: str) -> list:
    """Every object of `kind` the device pushed to the SuperLink, inflated; every object it
    pushed is of `kinds_allowed`, and no request holds any of `texts`."""
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.supercore.inflatable.inflatable_object import get_object_type_from_object_content
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    requests = proxy.requests()
    assert requests, "nothing recorded"
    for _, body in requests:  # no request of any kind carries the user's words
        for text in texts:
            assert text.encode() not in body
    contents = {}
    for path, body in requests:
        if path == "/v1/fleet/push-object":
            request = PushObjectRequest.FromString(body)
            contents[request.object_id] = request.object_content
    kinds = {oid: get_object_type_from_object_content(c) for oid, c in contents.items()}
    assert set(kinds.values()) <= kinds_allowed
    return [inflate_object_from_contents(oid, dict(contents), keep_object_contents=True)
            for oid, k in kinds.items() if k == kind]
