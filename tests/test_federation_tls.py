"""A federation over TLS with device keys, run on loopback exactly as the README tells an
operator and a device to run it (`floe federation serve --ssl-* --supernode-auth`, `floe sync
key`, `floe federation register`, `federation.root_certificates`, `floe sync start`); a
device whose key was never registered and one given another CA are turned away and say so;
and a device whose sync service is killed with SIGKILL while it installs the round's shared
adapter comes back, takes part in the next round, and never uses a half-installed adapter."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
from pathlib import Path

import pytest

from floe_app.config import load_config, write_config
from floe_app.federated.service import free_port
from floe_app.paths import resolve_paths
from floe_app.personalize.registry import Registry, file_problem
from floe_app.store import Store
from tests.test_federation_loopback import (
    GLOSSARY,
    device,
    floe,
    rounds_logged,
    run_floe,
    wait_for,
)

pytestmark = pytest.mark.slow


def make_pki(folder: Path) -> dict[str, Path]:
    """A throwaway CA, the SuperLink's certificate for 127.0.0.1 signed by it, and another
    CA that signed nothing of this federation."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir()
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(days=1)}

    def certificate(subject: str, key, issuer: x509.Name | None, issuer_key, ca: bool,
                    *extensions) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = x509.CertificateBuilder(
            subject_name=name, issuer_name=issuer or name, public_key=key.public_key(),
            serial_number=x509.random_serial_number(), **valid).add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    files = {}
    for name in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(f"Floe test {name}", key, None, None, True)
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(pem))
        if name == "ca":
            ca_key, ca_name = key, cert.subject
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = certificate(
        "localhost", server_key, ca_name, ca_key, False,
        x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]))
    files["cert"], files["key"] = folder / "server.pem", folder / "server.key"
    files["cert"].write_bytes(server.public_bytes(pem))
    files["key"].write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def join_over_tls(home: Path, ca: Path) -> None:
    """What a device sets, besides federation.enabled and address (device() did those)."""
    paths = resolve_paths({"FLOE_HOME": str(home)})
    config, _ = load_config(paths)
    config.federation.root_certificates = str(ca)
    write_config(paths, config)


def sync_pid(home: Path) -> int:
    return json.loads((home / "data" / "sync.json").read_text())["pid"]


@pytest.mark.timeout(600)
def test_tls_device_keys_refusals_and_a_device_killed_mid_round(tmp_path, base_cache):
    from floe_app.engine.local import bundled_model_path
    from floe_app.personalize.trainer import load_base

    load_base(bundled_model_path(), base_cache)  # dequantized once, before devices need it
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    address = f"127.0.0.1:{port}"
    alice, bob = (device(tmp_path, name, address, base_cache, "small", GLOSSARY[i])
                  for i, name in enumerate(("alice", "bob")))
    stranger = device(tmp_path, "stranger", address, base_cache)  # a key nobody registered
    lost = device(tmp_path, "lost", address, base_cache)  # told to trust another CA
    keys = {home: run_floe(home, "sync", "key") for home in (alice, bob, stranger, lost)}
    for home, process in keys.items():  # each device makes its key (at once: time)
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0 and "Send " in out, err
        assert (home / "config" / "node_key").stat().st_mode & 0o077 == 0
        join_over_tls(home, pki["other-ca" if home == lost else "ca"])

    # The operator, as the README says: TLS, device authentication, then one registration
    # per device key it was sent.
    operator = tmp_path / "operator"
    state = operator / "federation"
    serve = run_floe(operator, "federation", "serve", "--port", str(port), "--state-dir",
                     str(state), "--ssl-certfile", str(pki["cert"]), "--ssl-keyfile",
                     str(pki["key"]), "--ssl-ca-certfile", str(pki["ca"]), "--supernode-auth",
                     "--rounds", "2", "--rank", "4", "--steps", "1", "--learning-rate", "0.01",
                     "--min-nodes", "2", "--round-timeout", "150")
    try:
        wait_for(lambda: (state / "flwr-control" / "config.toml").exists(), 60,
                 "the SuperLink", serve)
        registrations = [run_floe(operator, "federation", "register",
                                  str(home / "config" / "node_key.pub"), "--state-dir",
                                  str(state)) for home in (alice, bob, lost)]
        for process in registrations:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0 and "Registered" in out, err
        again = floe(operator, "federation", "register",
                     str(alice / "config" / "node_key.pub"), "--state-dir", str(state))
        assert again.returncode == 1 and "already in use" in again.stderr

        starts = {home: run_floe(home, "sync", "start") for home in (alice, bob, stranger, lost)}
        results = {home: process.communicate(timeout=120) for home, process in starts.items()}
        for home in (alice, bob):
            assert starts[home].returncode == 0 and "Sync started" in results[home][0], \
                results[home]
        assert starts[stranger].returncode == 1
        assert "refused this device's key" in results[stranger][1]
        assert starts[lost].returncode == 1
        assert "TLS certificate does not verify" in results[lost][1]
        # And each says why in one plain line of its status.
        line = floe(stranger, "sync", "status").stdout.splitlines()[0]
        assert line.startswith("Sync: stopped: the federation refused this device's key"), line
        line = floe(lost, "sync", "status").stdout.splitlines()[0]
        assert line.startswith("Sync: stopped: this device refused to connect: the"
                               " federation's TLS certificate does not verify"), line
        assert "unable to get local issuer certificate" in line

        # Round 2: Alice's service is killed while it checks the shared adapter it received.
        wait_for(lambda: any(e.get("round") == 1 and "accepted" in e
                             for e in rounds_logged(state)), 300, "round 1", serve)
        incoming = alice / "data" / "shared" / "incoming.gguf"
        partial = incoming.with_name("incoming.gguf.partial")
        wait_for(lambda: incoming.exists() or partial.exists(), 120,
                 "Alice installing round 1's adapter", serve)
        os.killpg(sync_pid(alice), signal.SIGKILL)
        store = Store(alice / "data" / "floe.db")
        assert store.shared_adapters() == []  # nothing half-installed was recorded for use
        assert Registry(store, alice / "data" / "adapters").latest_shared() is None
        store.close()
        # Started again at once: the SuperLink holds the killed node's key for up to a
        # minute; `floe sync start` waits for it to let go.
        restarted = floe(alice, "sync", "start")
        assert restarted.returncode == 0 and "Sync started" in restarted.stdout, \
            restarted.stderr
        out, err = serve.communicate(timeout=400)
        assert serve.returncode == 0, err
        assert "round 1: 2 nodes, 2 updates aggregated" in out
        assert "final shared adapter (round 2) sent to 2 nodes, kept by 2" in out
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)
            serve.communicate(timeout=30)
        for home in (alice, bob, stranger, lost):
            floe(home, "sync", "stop")

    log = (state / "superlink.log").read_text()
    assert "Uvicorn running on https://" in log  # the SuperLink served TLS only
    first, second, final = [e for e in rounds_logged(state) if e["event"] != "privacy"]
    assert len(first["accepted"]) == 2 and first["published"]
    # Round 2 went on without the killed service: the SuperLink gave up on it after two
    # missed heartbeats ("Node Unavailable"), or did not pick it, already gone, or the
    # restarted service (the same node, by its key) never answered the message the killed
    # one held; or the restarted service joined in time and took part like the others.
    # Under secure aggregation (the default) a sum must hold at least 2 devices: Bob's
    # change alone is never unmasked, and the round says why...
    assert second["secure_aggregation"]
    assert all("Node Unavailable" in why or why == "no answer before the round's timeout"
               for why in second["declined"].values()), second
    rejoined = len(second["accepted"]) == 2
    if not rejoined:
        assert not second["accepted"] and not second["published"], second
        assert second["withheld"].startswith("secure aggregation stopped: 1 of"), second
    # ...and in the next round, the run's last, the restarted one took the final adapter.
    assert final["installed"] == 2 and final["nodes"] == 2

    store = Store(alice / "data" / "floe.db")
    try:
        uploads = [r.round for r in store.federation_rounds()
                   if r.outcome == "uploaded"]
        # The killed attempt at round 2 sent nothing; a rejoined service's own upload may.
        assert uploads == ([1, 2] if rejoined else [1]), (uploads, second)
        rows = store.shared_adapters()
        assert rows and all(file_problem(Path(r.path), r.size, r.sha256) is None
                            for r in rows)
        latest = Registry(store, alice / "data" / "adapters").latest_shared()
        assert latest is not None and latest.round == 2
        assert not (alice / "data" / "shared" / "incoming.gguf").exists()
    finally:
        store.close()


def test_a_key_flower_cannot_read_is_named_at_start_and_in_status(tmp_path, base_cache):
    """The real SuperNode reads the key before it connects: no SuperLink is needed."""
    pki = make_pki(tmp_path / "pki")
    home = device(tmp_path, "device", f"127.0.0.1:{free_port()}", base_cache)
    join_over_tls(home, pki["ca"])
    paths = resolve_paths({"FLOE_HOME": str(home)})
    config, _ = load_config(paths)
    config.federation.node_key = str(pki["ca"])  # a certificate, not a key
    write_config(paths, config)
    started = floe(home, "sync", "start")
    assert started.returncode == 1
    assert "federation.node_key is not a key Flower can read" in started.stderr
    line = floe(home, "sync", "status").stdout.splitlines()[0]
    assert line.startswith("Sync: stopped: federation.node_key is not a key Flower can read")
