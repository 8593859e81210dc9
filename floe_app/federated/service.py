"""Flower's processes for Floe: the SuperNode behind `floe sync`, the SuperLink and the run
behind `floe federation serve`. No flwr import here: they are programs of their own.

Every Flower process gets its own FLWR_HOME, telemetry and update checks off, and the
SuperLink never installs packages at run time (see ../shared/NOTES.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from floe_app.config import Config
from floe_app.errors import FloeError
from floe_app.paths import Paths
from floe_app.store.db import FederationRound, SharedAdapter, pid_alive

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def flower_env(flwr_home: Path) -> dict[str, str]:
    flwr_home.mkdir(parents=True, exist_ok=True)
    # Flower starts its helpers (flower-superexec, flwr-clientapp...) by name: they are in
    # Floe's environment, which is not on PATH under pipx.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
                FLWR_DISABLE_UPDATE_CHECK="1")


def flower_program(name: str) -> str:
    """A Flower executable from Floe's own environment (pipx keeps it there)."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FloeError(f"federated rounds need Flower ({name} not found): pipx install"
                        " 'floe-assistant[federated]'")
    return found


def bundle_dir() -> Path:
    """The Flower app bundle shipped with this Floe (floe_app/federated/bundle)."""
    return Path(str(resources.files("floe_app.federated").joinpath("bundle")))


def is_loopback(address: str) -> bool:
    return address.rsplit(":", 1)[0] in LOOPBACK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FloeError(f"the Flower process exited (code {process.returncode})")
        if port_open(host, port):
            return
        time.sleep(0.2)
    raise FloeError(f"nothing answers on {host}:{port} after {timeout:.0f} s")


# The device side: floe sync

@dataclass
class SyncState:
    pid: int
    address: str
    rank: int
    port: int


def _sync_file(paths: Paths) -> Path:
    return paths.data_dir / "sync.json"


def supernode_command(paths: Paths, config: Config, rank: int, port: int) -> list[str]:
    """The SuperNode for this device; refuses what would expose the user's updates."""
    federation = config.federation
    if not federation.enabled:
        raise FloeError("federated rounds are off: opt in first (settings F2,"
                        " federation.enabled = true)")
    if not federation.address:
        raise FloeError("no federation address: set federation.address (host:port from"
                        " the federation's operator)")
    command = [flower_program("flower-supernode"), "--superlink", federation.address,
               "--port", str(port), "--node-config",
               f'floe-home="{os.environ.get("FLOE_HOME", "")}" rank={rank}'
               f' federation="{federation.address}"']
    if federation.root_certificates:
        command += ["--root-certificates", str(Path(federation.root_certificates).expanduser())]
    elif is_loopback(federation.address):
        command += ["--insecure"]
    else:
        raise FloeError(f"{federation.address} is not on this machine: set"
                        " federation.root_certificates (the federation's TLS certificate)")
    if federation.node_key:
        if not federation.root_certificates:
            # Flower signs with the key only over TLS (its SuperNode exits with code 303).
            raise FloeError("federation.node_key needs TLS: set federation.root_certificates"
                            " (the federation's CA certificate) too")
        command += ["--auth-supernode-private-key",
                    str(Path(federation.node_key).expanduser())]
    return command


# What the SuperNode writes to sync.log when it gives up (flwr_exit): "Exit Code: N", then
# Flower's explanation. Read back to say, in one line, why a device is not taking part.
SUPERNODE_STARTED = "Starting Flower SuperNode"
CONNECTED = "SuperNode ID:"
ACTIVATION_REFUSED = "[code: 2004]"  # FLEET_NODE_ACTIVATION_FAILED, HTTP 412
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def exit_reason(log_text: str) -> str | None:
    """One line on why the SuperNode whose output is `log_text` stopped, or None if it
    did not stop on its own."""
    text = _ANSI.sub("", log_text)
    if "Exit Code:" not in text:
        return None
    # (`or [""]`: a log read while Flower is still writing it may end at "Exit Code:")
    code, *rest = [line.strip() for line in text.rsplit("Exit Code:", 1)[1].splitlines()] \
        or [""]
    detail = " ".join(line for line in rest[:3] if line)
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        why = re.search(r"certificate verify failed: ([^(]+)", detail)
        return ("this device refused to connect: the federation's TLS certificate does not"
                " verify against federation.root_certificates"
                + (f" ({why.group(1).strip()})" if why else ""))
    if ACTIVATION_REFUSED in detail:
        # The SuperLink gives one public reason for both (its own log tells them apart).
        return ("the federation refused this device's key (federation.node_key): it is not"
                " registered there (the operator registers its .pub file with floe federation"
                " register), or this device was connected under it less than a minute ago")
    if code == "302":  # SUPERNODE_NODE_AUTH_KEY_INVALID
        return ("federation.node_key is not a key Flower can read (an EC private key in"
                " OpenSSH form: floe sync key makes one)")
    return f"the SuperNode stopped (Flower exit code {code}: {' '.join(rest[:2]).strip()})"


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def sync_stopped(paths: Paths) -> str | None:
    """Why the last sync service stopped on its own (its sync.log), or None."""
    log = paths.data_dir / "sync.log"
    try:
        size = log.stat().st_size
    except OSError:
        return None
    last = _read_from(log, max(0, size - 65536)).rsplit(SUPERNODE_STARTED, 1)[-1]
    return exit_reason(last)


def make_node_key(paths: Paths) -> tuple[Path, Path]:
    """This device's key for federations that authenticate devices (created once): an
    ECDSA P-384 key in OpenSSH format, the form Flower's SuperNode reads, and its public
    half, which the operator registers. Returns (private key, public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = paths.config_dir / "node_key", paths.config_dir / "node_key.pub"
    if not private.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        # O_EXCL and 0600 at creation: the key is never readable by others, whatever the umask.
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def sync_state(paths: Paths) -> SyncState | None:
    """The running sync service, or None (a stale record of a dead one is removed)."""
    try:
        state = SyncState(**json.loads(_sync_file(paths).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not pid_alive(state.pid):
        _sync_file(paths).unlink(missing_ok=True)
        return None
    return state


@dataclass
class SyncSummary:
    """What `floe sync status` and the settings screen show."""

    state: SyncState | None
    rounds: list[FederationRound]
    shared: SharedAdapter | None
    policy: tuple[str, Any] | None = None  # (federation, privacy.Policy) last received
    stopped: str | None = None  # why the service stopped on its own (sync_stopped)

    @property
    def uploads(self) -> int:
        return sum(r.outcome == "uploaded" for r in self.rounds)

    @property
    def epsilon(self) -> float:
        """Epsilon spent by the uploads that were part of a DP release."""
        spent = [r.epsilon for r in self.rounds
                 if r.outcome == "uploaded" and r.epsilon is not None]
        return float(spent[-1]) if spent else 0.0

    @property
    def uploads_without_dp(self) -> int:
        return sum(r.outcome == "uploaded" and not (r.noise_multiplier or 0) > 0
                   for r in self.rounds)

    def statement(self) -> str:
        """The privacy paragraph of the federation this device last heard from."""
        from floe_app.federated.privacy import statement

        if self.policy is None:
            return ("Privacy: no federation round received yet; nothing has left this device"
                    " for a federation.")
        federation, policy = self.policy
        return f"Privacy in {federation}: {statement(policy)}"

    def lines(self, delta: float) -> list[str]:
        state = self.state
        lines = [f"Sync: running (pid {state.pid}), {state.address}, rank {state.rank}"
                 if state else f"Sync: stopped: {self.stopped} (floe sync start)"
                 if self.stopped else "Sync: not running (floe sync start)",
                 f"Rounds: {self.uploads} uploads, {len(self.rounds) - self.uploads} declined"
                 f" or refused; privacy spent: epsilon {self.epsilon:.2f} at delta {delta:g}"
                 + (f" ({self.uploads_without_dp} uploads without DP noise: no formal"
                    " guarantee for them)" if self.uploads_without_dp else "")]
        if self.rounds and self.rounds[-1].outcome != "uploaded":
            lines.append(f"Last: {self.rounds[-1].outcome}: {self.rounds[-1].reason}")
        if self.shared:
            lines.append(f"Shared adapter: round {self.shared.round or 'final'} of"
                         f" {self.shared.federation}, rank {self.shared.rank}")
        lines.append(self.statement())
        return lines


def sync_summary(paths: Paths) -> SyncSummary:
    from floe_app.federated.privacy import known_policy
    from floe_app.store import Store

    store = Store(paths.database)
    try:
        shared = store.shared_adapters()
        state = sync_state(paths)
        return SyncSummary(state, store.federation_rounds(), shared[-1] if shared else None,
                           known_policy(paths.data_dir),
                           None if state is not None else sync_stopped(paths))
    finally:
        store.close()


def start_sync(paths: Paths, config: Config, rank: int, connect_wait: float = 10.0,
               release_wait: float = 90.0) -> SyncState:
    """Start the SuperNode in the background, in its own session: it outlives the chat.

    Waits up to `connect_wait` seconds for it to join the federation; one that gives up in
    that time (refused, or a TLS certificate that does not verify) is reported with its
    reason. A federation that does not answer yet is not an error: the SuperNode retries."""
    # A record whose process is gone: the last service was killed (kill -9, a crash) and
    # never deactivated its node. A SuperLink that authenticates devices keeps such a node
    # "online" for up to two heartbeats (60 s) and refuses its key until then.
    killed = _sync_file(paths).exists()
    running = sync_state(paths)
    if running is not None:
        raise FloeError(f"sync is already running (pid {running.pid}, {running.address})")
    deadline = time.monotonic() + release_wait
    while True:
        state, failure = _spawn_supernode(paths, config, rank, connect_wait)
        if failure is None:
            return state
        _sync_file(paths).unlink(missing_ok=True)
        if not (killed and ACTIVATION_REFUSED in failure and time.monotonic() < deadline):
            raise FloeError(f"sync stopped: {exit_reason(failure) or failure}; see"
                            f" {paths.data_dir / 'sync.log'}")
        time.sleep(5)  # until the SuperLink lets the killed service's node go


def _spawn_supernode(paths: Paths, config: Config, rank: int,
                     connect_wait: float) -> tuple[SyncState, str | None]:
    """(the started service, None), or (..., the log of a SuperNode that gave up)."""
    port = free_port()
    command = supernode_command(paths, config, rank, port)
    log_path = paths.data_dir / "sync.log"
    log = open(log_path, "ab")  # noqa: SIM115 (the child keeps it)
    offset = log.tell()
    process = subprocess.Popen(command, env=flower_env(paths.data_dir / "flwr"),
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               start_new_session=True)
    log.close()
    state = SyncState(process.pid, config.federation.address, rank, port)
    _sync_file(paths).write_text(json.dumps(asdict(state)))
    deadline = time.monotonic() + connect_wait
    while time.monotonic() < deadline:
        text = _read_from(log_path, offset)
        if CONNECTED in text:
            return state, None
        if process.poll() is not None:
            return state, (text if exit_reason(text) else
                           f"the SuperNode exited (code {process.returncode})")
        time.sleep(0.2)
    return state, None  # still connecting: Flower keeps retrying an unreachable SuperLink


def run_sync(paths: Paths, config: Config, rank: int) -> str:
    """`floe sync run`: become the SuperNode (for systemd and launchd). Returns, with the
    reason, only when it should not run; a service manager then leaves it stopped."""
    running = sync_state(paths)
    if running is not None:
        return f"sync is already running (pid {running.pid})"
    if not config.federation.enabled:
        return "federated rounds are off (federation.enabled = false): not starting"
    port = free_port()
    command = supernode_command(paths, config, rank, port)
    # exec keeps this pid: `floe sync status` and `stop` find the SuperNode by it.
    _sync_file(paths).write_text(json.dumps(asdict(SyncState(
        os.getpid(), config.federation.address, rank, port))))
    os.execve(command[0], command, flower_env(paths.data_dir / "flwr"))
    raise AssertionError("exec returned")  # (never: execve replaces this process)


def stop_sync(paths: Paths, timeout: float = 10.0) -> bool:
    """Stop the SuperNode (and the ClientApp it runs): no more uploads. False if none ran."""
    state = sync_state(paths)
    if state is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(state.pid):
        os.killpg(state.pid, signal.SIGKILL)
    _sync_file(paths).unlink(missing_ok=True)
    return True


# The operator side: floe federation serve

@dataclass
class ServeOptions:
    state_dir: Path
    run_config: dict[str, object]  # [tool.flwr.app.config] overrides (rounds, rank, ...)
    host: str = "127.0.0.1"
    port: int = 9092
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_ca_certfile: str = ""
    supernode_auth: bool = False
    keep: bool = False  # keep the SuperLink up after the run ends


def superlink_command(options: ServeOptions) -> list[str]:
    command = [flower_program("flower-superlink"), "--host", options.host, "--port",
               str(options.port), "--database", str(options.state_dir / "superlink.db"),
               "--disable-runtime-dependency-installation"]
    if options.ssl_certfile:
        command += ["--ssl-certfile", options.ssl_certfile, "--ssl-keyfile",
                    options.ssl_keyfile, "--ssl-ca-certfile", options.ssl_ca_certfile]
    else:
        command += ["--insecure"]
    if options.supernode_auth:
        command += ["--enable-supernode-auth"]
    return command


def superlink_problem(options: ServeOptions) -> str | None:
    """Why Flower's SuperLink would refuse these options, said before starting it."""
    tls = (options.ssl_certfile, options.ssl_keyfile, options.ssl_ca_certfile)
    if any(tls) and not all(tls):
        return "TLS needs all three of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile"
    if options.supernode_auth and not options.ssl_certfile:
        return "--supernode-auth needs TLS (--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile)"
    return None


def flwr_json(control_home: Path, *args: str) -> dict:
    """`flwr ARGS --format json` against the SuperLink in control_home/config.toml."""
    result = subprocess.run([flower_program("flwr"), *args, "--format", "json"],
                            env=flower_env(control_home), capture_output=True, text=True,
                            timeout=120)
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise FloeError(f"flwr {args[0]} failed: {(result.stderr or result.stdout)[-300:]}"
                        ) from None


def register_device(state_dir: Path, public_key: Path, name: str = "") -> str:
    """Let the device whose key this is join the federation served from `state_dir`
    (`floe federation serve --supernode-auth`, running). Returns its node id."""
    control = state_dir / "flwr-control"
    if not (control / "config.toml").exists():
        raise FloeError(f"no federation served from {state_dir}: start floe federation serve"
                        " --supernode-auth (with --state-dir) first")
    if not public_key.is_file():
        raise FloeError(f"no such key file: {public_key}")
    reply = flwr_json(control, "supernode", "register", str(public_key.resolve()), "floe",
                      *(["--name", name] if name else []))
    # flwr exits 0 either way: its JSON says whether it worked.
    if not reply.get("success"):
        message = str(reply.get("error-message", "")).splitlines()
        raise FloeError(f"the SuperLink did not register {public_key.name}:"
                        f" {message[-1] if message else reply}")
    return str(reply["node-id"])


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


class Operator:
    """A SuperLink child process and runs of Floe's bundle on it."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        options.state_dir.mkdir(parents=True, exist_ok=True)
        self.control_home = options.state_dir / "flwr-control"
        self.link: subprocess.Popen | None = None

    def start_link(self) -> None:
        log = open(self.options.state_dir / "superlink.log", "ab")  # noqa: SIM115
        self.link = subprocess.Popen(superlink_command(self.options),
                                     env=flower_env(self.options.state_dir / "flwr"),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        (self.options.state_dir / "superlink.pid").write_text(str(self.link.pid))
        connect = "127.0.0.1" if self.options.host in ("0.0.0.0", "::") else self.options.host
        wait_for_port(connect, self.options.port, 60, self.link)
        entry = {"address": f"{connect}:{self.options.port}"}
        if self.options.ssl_certfile:
            entry["root-certificates"] = self.options.ssl_ca_certfile
        else:
            entry["insecure"] = True
        lines = ["[superlink]", 'default = "floe"', "", "[superlink.floe]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
        self.control_home.mkdir(parents=True, exist_ok=True)
        (self.control_home / "config.toml").write_text("\n".join(lines) + "\n")

    def stop_link(self) -> None:
        if self.link is not None and self.link.poll() is None:
            os.killpg(self.link.pid, signal.SIGTERM)
            try:
                self.link.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.link.pid, signal.SIGKILL)
                self.link.wait()

    def _flwr(self, *args: str) -> dict:
        return flwr_json(self.control_home, *args)

    def submit(self) -> str:
        config = dict(self.options.run_config, **{"state-dir": str(self.options.state_dir)})
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())
        reply = self._flwr("run", str(bundle_dir()), "floe", "--run-config", overrides)
        if not reply.get("success"):
            raise FloeError(f"the SuperLink refused the run: {reply.get('error-message')}")
        return str(reply["run-id"])

    def run_status(self, run_id: str) -> tuple[str, str]:
        """("pending" | "running" | "finished:completed" | "finished:failed" ..., details)."""
        reply = self._flwr("ls", "floe", "--run-id", run_id)
        if not reply.get("success"):
            raise FloeError(f"cannot read run {run_id}: {reply.get('error-message')}")
        run = reply["runs"][0]
        return run["status"], run.get("status-details", "")

    def follow(self, run_id: str, echo: Callable[[str], None], status_every: float = 5.0) -> str:
        """Print the round log as it grows until the run ends; returns its final status.

        `flwr run` reports success even when the ServerApp fails, so the run's status is
        read back from the SuperLink (every few seconds: each `flwr ls` is a process)."""
        log = self.options.state_dir / "rounds.jsonl"
        seen = log.stat().st_size if log.exists() else 0

        def print_new_lines() -> None:
            nonlocal seen
            if log.exists() and log.stat().st_size > seen:
                with open(log, encoding="utf-8") as fh:
                    fh.seek(seen)
                    for line in fh:
                        echo(describe(json.loads(line)))
                    seen = fh.tell()

        stopped = ("the SuperLink stopped; start floe federation serve again to carry on from"
                   " the last completed round")
        next_status = time.monotonic() + status_every
        while True:
            print_new_lines()
            if self.link is not None and self.link.poll() is not None:
                print_new_lines()  # a round logged just before the SuperLink died
                raise FloeError(stopped)
            if time.monotonic() >= next_status:
                try:
                    status, details = self.run_status(run_id)
                except FloeError:
                    # `flwr ls` fails first when the SuperLink has just died: name the cause.
                    if self.link is not None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.link.wait(15)  # its death may take a while to show
                        if self.link.poll() is not None or not port_open(
                                "127.0.0.1", self.options.port):
                            print_new_lines()
                            raise FloeError(stopped) from None
                    raise
                if status.startswith("finished"):
                    print_new_lines()
                    return status + (f" ({details})" if details and details != "N/A" else "")
                next_status = time.monotonic() + status_every
            time.sleep(0.5)


def describe(entry: dict) -> str:
    """One line of the operator's round log."""
    if entry.get("event") == "privacy":
        mode = entry["mode"]
        what = {"none": "no DP noise", "central": "central DP (the server adds the noise)",
                "local": "local DP (every device adds the noise)",
                "distributed": "distributed DP (every device adds a share of the noise)"}[mode]
        what += (", secure aggregation (the server sees only each round's sum)"
                 if entry.get("secure_aggregation") else ", no secure aggregation")
        epsilon = (f", epsilon {entry['epsilon']:.2f} at delta {entry['delta']:g} per user"
                   if entry.get("epsilon") is not None else "")
        return (f"privacy: {what}{epsilon}; {entry['reason']}. Every device is told:"
                f" {entry['statement']}")
    if "error" in entry:
        return (f"round {entry['round']}: failed ({entry['error']}); the shared adapter is"
                " unchanged")
    if entry.get("event") == "final":
        refused = f", refused by {len(entry['refused'])}" if entry["refused"] else ""
        return (f"final shared adapter (round {entry['round']}) sent to {entry['nodes']}"
                f" nodes, kept by {entry['installed']}{refused}")
    accepted = entry["accepted"]
    ranks = ", ".join(str(r) for r in sorted(u["rank"] for u in accepted.values()))
    parts = [f"round {entry['round']}: {entry['nodes']} nodes, {len(accepted)} updates"
             f" aggregated" + (f" (ranks {ranks})" if accepted else "")]
    for node, why in entry["refused"].items():
        parts.append(f"refused node {node}: {why}")
    for node, why in entry["declined"].items():
        parts.append(f"node {node} declined: {why}")
    if entry.get("published") is False:
        parts.append(f"shared adapter unchanged, {entry['withheld']}")
    elif entry.get("step", 1.0) < 1.0:
        parts.append(f"moved {entry['step']:g} of the way to the round's average (all of it"
                     " would raise general-text perplexity past what devices accept)")
    parts.append(f"{entry['seconds']} s, {entry['version']}")
    return "; ".join(parts)
