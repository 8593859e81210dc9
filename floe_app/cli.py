"""The `floe` command. Imports stay inside the commands so `floe --version` starts instantly.

Each command is a pair: `add_NAME` declares its options, next to `cmd_NAME`, which runs it;
the pairs are grouped by concern (chat and history, memory and learning, federation,
plugins, doctor), and COMMANDS lists them in the order `floe --help` shows.

Exit codes: 0 ok, 1 a runtime error (one line on stderr), 2 a usage error, 130 Ctrl+C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from floe_app import __version__
from floe_app.errors import FloeError, UsageError, one_line

if TYPE_CHECKING:
    from floe_app.config import Config
    from floe_app.paths import Paths
    from floe_app.plugins import Plugins
    from floe_app.session import ChatSession

Commands = argparse._SubParsersAction  # what add_NAME adds its command to


class FloeParser(argparse.ArgumentParser):
    command_names: frozenset[str] = frozenset()  # the root parser's commands

    def error(self, message: str) -> NoReturn:
        # It quotes the arguments: keep it on one line.
        super().error(one_line(message, limit=None))


def build_parser() -> FloeParser:
    parser = FloeParser(
        prog="floe", description="Chat with a small language model that runs on this computer.",
        epilog="With no command, floe opens the chat in the terminal.")
    parser.add_argument("--version", action="version", version=f"floe {__version__}")
    parser.add_argument("--model", metavar="PATH", help="GGUF model to use instead of the"
                        " configured one (default: the bundled SmolLM2-135M-Instruct)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    parser.command_names = frozenset(commands.choices)
    return parser


def command(commands: Commands, name: str, run: Callable[[argparse.Namespace], int],
            help: str) -> FloeParser:
    """Add command `name`, run by `run(args)`; returns its parser for its options."""
    parser = commands.add_parser(name, help=help)
    parser.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from floe_app.paths import private_umask

    private_umask()  # everything Floe and its children write is private to this account
    parser = build_parser()
    # Bytes that are not UTF-8 reach Python as lone surrogates, which SQLite and the terminal
    # refuse; they become U+FFFD, so the rest of the text is kept.
    argv = [_utf8(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in parser.command_names:
            # Not one of ours: perhaps a plugin's command (plugins load only on this path).
            handled = run_plugin_command(argv[0], argv[1:])
            if handled is not None:
                return handled
        args = parser.parse_args(argv)
        if args.command is None:
            return run_tui(args)
        return args.run(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"floe: error: {one_line(exc, limit=None)}", file=sys.stderr)
        return 2
    except FloeError as exc:
        print(f"floe: error: {one_line(exc, limit=None)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("floe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `floe history show 1 | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # a bug: still one line (FLOE_DEBUG=1 for the traceback)
        if os.environ.get("FLOE_DEBUG"):
            raise
        print(f"floe: error: unexpected {type(exc).__name__}: {one_line(exc, limit=None)}"
              " (a bug in Floe: please report it; FLOE_DEBUG=1 shows where)", file=sys.stderr)
        return 1


def _utf8(arg: str) -> str:
    try:
        return arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte produced
        return arg.encode("utf-8", "replace").decode("utf-8")


# Settings, the session and plugins, loaded by the commands that need them


def load_settings(report: bool = True) -> tuple[Paths, Config, list[str]]:
    from floe_app.config import load_config
    from floe_app.paths import resolve_paths

    paths = resolve_paths()
    notes = paths.secure()
    config, warnings = load_config(paths)
    for note in notes if report else []:
        print(f"floe: note: {note}", file=sys.stderr)
    for warning in warnings if report else []:
        print(f"floe: warning: {warning}", file=sys.stderr)
    return paths, config, (warnings if report else notes + warnings)


def open_session(args: argparse.Namespace, plugins: Plugins | None = None) -> ChatSession:
    from floe_app.session import ChatSession

    paths, config, _ = load_settings()
    return ChatSession.open(paths, config, model_override=args.model, plugins=plugins)


def load_plugins() -> Plugins:
    from floe_app.plugins import Plugins

    plugins = Plugins()
    for problem in plugins.problems:
        print(f"floe: warning: {problem}", file=sys.stderr)
    return plugins


def run_tui(args: argparse.Namespace) -> int:
    from floe_app.session import ChatSession
    from floe_app.tui.app import FloeApp

    paths, config, warnings = load_settings(report=False)  # shown inside the app instead
    session = ChatSession.open(paths, config, model_override=args.model)
    FloeApp(session, warnings=warnings).run()
    return 0


# Chat and history


def add_ask(commands: Commands) -> None:
    ask = command(commands, "ask", cmd_ask, "answer one prompt, streamed to stdout")
    ask.add_argument("prompt", nargs="*", help="the prompt; '-' or none reads standard input")
    ask.add_argument("--json", action="store_true",
                     help="print one JSON object {text, stats} instead of streaming")
    ask.add_argument("--conversation", "-c", type=int, metavar="ID",
                     help="continue this conversation (see floe history list)")
    ask.add_argument("--mode", choices=["local", "cloud", "fused"],
                     help="local model only, the cloud's text, or both fused token by token"
                     " (default: chat.mode; fused when a cloud is configured)")


def read_prompt(words: list[str]) -> str:
    if words and words != ["-"]:
        return " ".join(words)
    if sys.stdin.isatty():
        raise UsageError("no prompt: pass it as arguments or pipe it on standard input")
    return sys.stdin.read()


def cmd_ask(args: argparse.Namespace) -> int:
    from floe_app.session import Delta, Finished, Notice

    prompt = read_prompt(args.prompt)
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    session = open_session(args, load_plugins())
    if args.mode != "local":
        session.warm_cloud()
    conversation_id = args.conversation or session.store.create_conversation()
    finished = None
    for event in session.reply(conversation_id, prompt, mode=args.mode):
        if isinstance(event, Notice):
            print(f"floe: note: {event.text}", file=sys.stderr)
        elif isinstance(event, Delta) and not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    if args.json:
        print(json.dumps({"text": finished.text, "stats": finished.stats,
                          "conversation_id": conversation_id,
                          "message_id": finished.message_id}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


def add_history(commands: Commands) -> None:
    history = command(commands, "history", cmd_history,
                      "list, show, search or export conversations")
    actions = history.add_subparsers(dest="history_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="conversations, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="print a conversation as Markdown")
    show.add_argument("id", type=int)
    show.add_argument("--provenance", action="store_true",
                      help="tint each stretch of Floe's fused replies by where it came from")
    search = actions.add_parser("search", help="full-text search over all messages")
    search.add_argument("query", nargs="+")
    search.add_argument("--json", action="store_true")
    export = actions.add_parser("export", help="write a conversation to a file")
    export.add_argument("id", type=int)
    export.add_argument("--output", "-o", metavar="FILE",
                        help="where to write (default: floe-ID.md, or .json with --format json)")
    export.add_argument("--format", choices=["markdown", "json"], default="markdown")


def cmd_history(args: argparse.Namespace) -> int:
    from floe_app.session import conversation_markdown, export_conversation

    session = open_session(args)
    store = session.store
    action = args.history_command
    if action == "list":
        conversations = store.conversations()[: max(args.limit, 0)]
        if args.json:
            print(json.dumps([vars(c) for c in conversations], ensure_ascii=False))
        for c in [] if args.json else conversations:
            print(f"{c.id:>5}  {c.updated_at[:16].replace('T', ' ')}  {c.message_count:>4} msgs"
                  f"  {c.title}")
        return 0
    if action == "search":
        hits = store.search(" ".join(args.query))
        if args.json:
            print(json.dumps([vars(h) for h in hits], ensure_ascii=False))
        for h in [] if args.json else hits:
            snippet = " ".join(h.snippet.split())
            print(f"{h.conversation_id:>5}  {h.conversation_title}  ({h.role}): {snippet}")
        return 0
    conversation = store.conversation(args.id)
    if conversation is None:
        raise FloeError(f"no conversation with id {args.id} (see floe history list)")
    messages = store.messages(args.id)
    if action == "show":
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(conversation_markdown(conversation, messages,
                                    colour if args.provenance else None))
        return 0
    print(export_conversation(conversation, messages, args.format,
                              Path(args.output) if args.output else None))
    return 0


def add_cloud(commands: Commands) -> None:
    cloud = command(commands, "cloud", cmd_cloud, "what the configured cloud can do for fusion")
    actions = cloud.add_subparsers(dest="cloud_command", required=True)
    probe = actions.add_parser(
        "probe", help="ask the cloud now (a few tiny requests, in the ledger) and remember")
    probe.add_argument("--json", action="store_true")


def cmd_cloud(args: argparse.Namespace) -> int:
    session = open_session(args)
    target = session.cloud_target()
    profile = session.probe_cloud()
    if args.json:
        print(json.dumps({"base_url": target.base_url if target else None,
                          "model": target.model if target else None,
                          "profile": profile.to_json(), "summary": profile.describe()}))
        return 0
    assert target is not None
    print(f"{target.base_url} ({target.model}): {profile.describe()}")
    for note in profile.notes:
        print(f"  - {note}")
    return 0


def add_ledger(commands: Commands) -> None:
    ledger = command(commands, "ledger", cmd_ledger, "every request that left this machine")
    ledger.add_argument("--limit", type=int, default=20)
    ledger.add_argument("--json", action="store_true")
    ledger.add_argument("--full", action="store_true", help="print the whole text sent")


def cmd_ledger(args: argparse.Namespace) -> int:
    rows = open_session(args).store.ledger(max(args.limit, 0))
    if args.json:
        print(json.dumps([vars(r) for r in rows], ensure_ascii=False))
        return 0
    if not rows:
        print("Nothing has left this machine.")
    for r in rows:
        received = "?" if r.bytes_received is None else f"{r.bytes_received:,}"
        purpose = f" ({r.purpose})" if r.purpose else ""
        print(f"{r.id:>5}  {r.created_at[:19].replace('T', ' ')}  {r.outcome or '?':<13}"
              f" sent {r.bytes_sent:,} B, received {received} B  {r.endpoint}{purpose}")
        text = r.text_sent if args.full else " ".join(r.text_sent.split())[-160:]
        print(f"       {'' if args.full else '…'}{text}")
    return 0


# Memory and learning


def add_remember(commands: Commands) -> None:
    remember = command(commands, "remember", cmd_remember,
                       "remember a fact about you (local only)")
    remember.add_argument("text", nargs="+")


def cmd_remember(args: argparse.Namespace) -> int:
    from floe_app.default_plugins.memory_commands import remembered

    print(remembered(open_session(args).remember(" ".join(args.text))))
    return 0


def add_memories(commands: Commands) -> None:
    command(commands, "memories", cmd_memories, "list the facts Floe remembers")


def cmd_memories(args: argparse.Namespace) -> int:
    from floe_app.default_plugins.memory_commands import listed_memories

    print(listed_memories(open_session(args).store))
    return 0


def add_forget(commands: Commands) -> None:
    forget = command(commands, "forget", cmd_forget, "forget a memory note")
    forget.add_argument("id")


def cmd_forget(args: argparse.Namespace) -> int:
    from floe_app.default_plugins.memory_commands import forget

    print(forget(open_session(args).store, args.id.strip()))
    return 0


def add_rate(commands: Commands) -> None:
    rate = command(commands, "rate", cmd_rate, "thumbs up or down on a reply (floe ask --json"
                   " prints its message_id)")
    rate.add_argument("message_id", type=int)
    rate.add_argument("rating", choices=["up", "down", "none"])


def cmd_rate(args: argparse.Namespace) -> int:
    learning = open_session(args).learning
    learning.rate(args.message_id, {"up": 1, "down": -1, "none": None}[args.rating])
    print(f"Saved. {learning.line()}")
    return 0


def add_correct(commands: Commands) -> None:
    correct = command(commands, "correct", cmd_correct, "what a reply should have said; the"
                      " local model learns it")
    correct.add_argument("message_id", type=int)
    correct.add_argument("text", nargs="+")


def cmd_correct(args: argparse.Namespace) -> int:
    learning = open_session(args).learning
    learning.correct(args.message_id, " ".join(args.text))
    print(f"Saved. {learning.line()}")
    return 0


def add_examples(commands: Commands) -> None:
    examples = command(commands, "examples", cmd_examples, "what the local model learns from")
    examples.add_argument("--json", action="store_true")


def cmd_examples(args: argparse.Namespace) -> int:
    dataset = open_session(args).learning.dataset()
    if args.json:
        print(json.dumps([vars(e) for e in dataset.examples], ensure_ascii=False))
        return 0
    for source, examples in dataset.by_source().items():
        print(f"{source} ({len(examples)})")
        for e in examples:
            print(f"  [{e.source_id}] {e.prompt} -> {' '.join(e.answer.split())[:100]}")
    return 0


def add_train(commands: Commands) -> None:
    train = command(commands, "train", cmd_train,
                    "teach the local model what it should learn now")
    train.add_argument("--status", action="store_true", help="show the last or running job")
    train.add_argument("--force", action="store_true",
                       help="train even if paused or nothing changed")
    train.add_argument("--tier", choices=["small", "medium", "large"],
                       help="training size (default: learning.tier)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: from the tier)")
    train.add_argument("--background", action="store_true", help=argparse.SUPPRESS)


def cmd_train(args: argparse.Namespace) -> int:
    session = open_session(args)
    if args.status:
        status = session.learning.status()
        print(status.line() if status else "No training has run yet.")
        return 0
    if args.background:
        os.nice(10)  # the chat and everything else the user runs come first
    from floe_app.personalize.job import run_training

    def show(status: Any) -> None:
        if status.state == "training" and status.steps:
            done = int(30 * status.step / status.steps)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] step {status.step}/{status.steps}"
                  f" loss {status.loss:.3f}", end="", file=sys.stderr, flush=True)
        elif status.state in ("loading", "evaluating"):
            print(f"\n{status.message}" if status.state == "evaluating" else status.message,
                  file=sys.stderr, flush=True)

    result = run_training(session.paths, session.config, session.model_path,
                          force=args.force, tier_name=args.tier, steps=args.steps,
                          progress=None if args.background else show)
    print(result.message)
    return 0


def add_adapters(commands: Commands) -> None:
    adapters = command(commands, "adapters", cmd_adapters,
                       "list, use or roll back adapter versions")
    actions = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="versions, newest last")
    listing.add_argument("--json", action="store_true")
    use = actions.add_parser("use", help="use version N (0: no adapter)")
    use.add_argument("version", type=int)
    actions.add_parser("rollback", help="go back to the version used before")


def cmd_adapters(args: argparse.Namespace) -> int:
    from floe_app.personalize.registry import scores

    session = open_session(args)
    registry = session.registry
    if args.adapters_command == "use":
        registry.use(args.version)
        print(f"Using {'no adapter' if args.version == 0 else f'v{args.version}'}.")
        return 0
    if args.adapters_command == "rollback":
        version = registry.rollback()
        print(f"Rolled back: now using {f'v{version}' if version else 'no adapter'}.")
        return 0
    rows, active = registry.versions(), registry.active_version()
    if args.json:
        print(json.dumps({"active": active, "versions": [vars(r) for r in rows]}))
        return 0
    if not rows:
        print("No adapters yet: teach Floe something, then floe train.")
    for r in rows:
        mark = "*" if r.version == active else " "
        recall, rise = scores(r)
        print(f"{mark} v{r.version:<3} {r.created_at[:16].replace('T', ' ')}  {r.status:<9}"
              f" {r.meta.get('tier', '?'):<6} r{r.meta.get('rank', '?'):<3} recall {recall:>4}"
              f"  perplexity {rise:>6}  {r.reason or ''}")
    print(f"{'*' if active == 0 else ' '} v0   the base model alone")
    return 0


# Federation


def add_private(commands: Commands) -> None:
    private = command(commands, "private", cmd_private, "keep a conversation out of what a"
                      " federation learns from (or let it back in)")
    private.add_argument("conversation", type=int)
    private.add_argument("state", choices=["on", "off"], nargs="?", default="on")


def cmd_private(args: argparse.Namespace) -> int:
    session = open_session(args)
    if session.store.conversation(args.conversation) is None:
        raise FloeError(f"no conversation {args.conversation} (see floe history list)")
    session.store.set_conversation_private(args.conversation, args.state == "on")
    print(f"Conversation {args.conversation} is "
          + ("private: no federation learns from it." if args.state == "on" else
             "shareable again (only accepted replies and corrections are shared)."))
    return 0


def add_sync(commands: Commands) -> None:
    sync = command(commands, "sync", cmd_sync, "take part in federated rounds in the background")
    actions = sync.add_subparsers(dest="sync_command", metavar="ACTION", required=True)
    actions.add_parser("start", help="start the sync service (stays up after the chat)")
    actions.add_parser("stop", help="stop it: nothing more is uploaded")
    status = actions.add_parser("status", help="service, rounds, privacy spent")
    status.add_argument("--json", action="store_true")
    actions.add_parser("run", help="run the service in the foreground (systemd, launchd)")
    actions.add_parser("key", help="this device's key for federations that authenticate"
                       " devices (created once; the operator registers its .pub file)")


def cmd_sync(args: argparse.Namespace) -> int:
    from floe_app.federated import service
    from floe_app.personalize.tiers import tier_for

    paths, config, _ = load_settings()
    if args.sync_command == "stop":
        print("Sync stopped: nothing more is uploaded." if service.stop_sync(paths)
              else "Sync is not running.")
        return 0
    if args.sync_command == "status":
        return print_sync_status(paths, config, args.json)
    if args.sync_command == "key":
        from floe_app.config import write_config

        private, public = service.make_node_key(paths)
        if not config.federation.node_key:
            config.federation.node_key = str(private)
            write_config(paths, config)
        elif Path(config.federation.node_key).expanduser() != private:
            print(f"floe: note: federation.node_key is {config.federation.node_key}, not this"
                  " key: change it in settings to use this one", file=sys.stderr)
        print(f"This device's key: {private}. Send {public} to the federation's operator"
              " (floe federation register).")
        return 0
    tier, _ = tier_for(config.learning)
    if args.sync_command == "run":
        print(f"floe sync run: {service.run_sync(paths, config, tier.rank)}", file=sys.stderr)
        return 0
    state = service.start_sync(paths, config, tier.rank)
    print(f"Sync started (pid {state.pid}): rank {state.rank} ({tier.name} tier), joining"
          f" {state.address} when this computer is idle and on power. Log:"
          f" {paths.data_dir / 'sync.log'}")
    return 0


def print_sync_status(paths: Paths, config: Config, as_json: bool) -> int:
    from floe_app.federated import service

    summary = service.sync_summary(paths)
    if as_json:
        state = summary.state
        print(json.dumps({"running": state is not None, "pid": state and state.pid,
                          "address": state and state.address, "rank": state and state.rank,
                          "uploads": summary.uploads, "epsilon": summary.epsilon,
                          "delta": config.federation.delta,
                          "rounds": [vars(r) for r in summary.rounds],
                          "shared": summary.shared and vars(summary.shared),
                          "stopped": summary.stopped,
                          "privacy": summary.statement(),
                          "policy": summary.policy[1].to_json() if summary.policy else None}))
        return 0
    print("\n".join(summary.lines(config.federation.delta)))
    return 0


def add_federation(commands: Commands) -> None:
    federation = command(commands, "federation", cmd_federation, "run a federation (operators)")
    actions = federation.add_subparsers(dest="federation_command", metavar="ACTION",
                                        required=True)
    serve = actions.add_parser(
        "serve", help="start a Flower SuperLink and run rounds of Floe's shared adapter")
    serve.add_argument("--host", default="127.0.0.1",
                       help="listen address (0.0.0.0: every interface; use TLS then)")
    serve.add_argument("--port", type=int, default=9092)
    serve.add_argument("--state-dir", type=Path,
                       help="SuperLink database, shared adapters, round log (default: data"
                            " dir/federation)")
    serve.add_argument("--rounds", type=int, default=4,
                       help="total rounds (a restarted serve carries on to this number; 4:"
                            " measured, 10 devices each recalled 0%%, 22-26%%, 47-59%% and"
                            " 69-70%% of the others' terms after rounds 1 to 4)")
    serve.add_argument("--rank", type=int, default=16, help="rank of the shared adapter")
    serve.add_argument("--clip-norm", type=float, default=20.0,
                       help="L2 bound on one device's change (20: honest changes measured"
                            " 12-24 at the default steps and learning rate)")
    serve.add_argument("--secure-aggregation", choices=["on", "off"], default="on",
                       help="on (default): the server sees only each round's sum (Flower's"
                            " SecAgg+), not one device's change; off: it sees and checks"
                            " every update (needed for --privacy central)")
    serve.add_argument("--privacy", default="auto",
                       choices=["auto", "none", "central", "local", "distributed"],
                       help="auto (default): DP noise when enough devices per round can bear"
                            " it, else none (said to every device); none; distributed (every"
                            " device adds a share of the noise; secure aggregation only);"
                            " central (the server adds it once to the sum; needs"
                            " --secure-aggregation off); local (every device adds all of it)")
    serve.add_argument("--epsilon", type=float, default=8.0,
                       help="DP target per user over all rounds, at --delta")
    serve.add_argument("--delta", type=float, default=1e-5)
    serve.add_argument("--noise-multiplier", type=float, default=None,
                       help="DP noise multiplier (default: the least that meets --epsilon)")
    serve.add_argument("--perplexity-margin", type=float, default=0.05,
                       help="move the shared adapter only as far towards a round's"
                            " average as keeps general-text perplexity within this at every"
                            " device rank (1, 1/2, 1/4 or 1/8 of the way; else not at all)")
    serve.add_argument("--steps", type=int, default=20, help="local steps per round")
    serve.add_argument("--learning-rate", type=float, default=5e-3,
                       help="devices' local learning rate (5e-3: measured, 3 devices taught"
                            " each other 100%% of their terms; 2e-3: 0%%, 1e-2: 67%%)")
    serve.add_argument("--min-nodes", type=int, default=2,
                       help="wait for this many devices before a round")
    serve.add_argument("--round-timeout", type=float, default=900.0)
    serve.add_argument("--ssl-certfile", default="")
    serve.add_argument("--ssl-keyfile", default="")
    serve.add_argument("--ssl-ca-certfile", default="")
    serve.add_argument("--supernode-auth", action="store_true",
                       help="only registered devices may join (floe federation register)")
    serve.add_argument("--keep", action="store_true",
                       help="keep the SuperLink running after the run")
    register = actions.add_parser(
        "register", help="let a device join a serve --supernode-auth federation (its key)")
    register.add_argument("public_key", type=Path, metavar="KEY.pub")
    register.add_argument("--state-dir", type=Path, help="as given to serve")
    register.add_argument("--name", default="", help="a name for the device")


def serve_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerApp's run config from `floe federation serve`'s options (the bundle's
    [tool.flwr.app.config] holds the same defaults, for `flwr run`)."""
    return {"rounds": args.rounds, "rank": args.rank, "clip-norm": args.clip_norm,
            "noise-multiplier": -1.0 if args.noise_multiplier is None
            else args.noise_multiplier, "steps": args.steps,
            "learning-rate": args.learning_rate, "min-nodes": args.min_nodes,
            "round-timeout": args.round_timeout, "privacy": args.privacy,
            "epsilon": args.epsilon, "delta": args.delta,
            "perplexity-margin": args.perplexity_margin,
            "secure-aggregation": args.secure_aggregation == "on"}


def cmd_federation(args: argparse.Namespace) -> int:
    from floe_app.federated import service

    paths, _, _ = load_settings()
    if args.federation_command == "register":
        state_dir = (args.state_dir or paths.data_dir / "federation").expanduser().resolve()
        node = service.register_device(state_dir, args.public_key.expanduser(), args.name)
        print(f"Registered {args.public_key} as node {node}: that device may join now.")
        return 0
    options = service.ServeOptions(
        state_dir=(args.state_dir or paths.data_dir / "federation").expanduser().resolve(),
        run_config=serve_run_config(args),
        host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile, ssl_ca_certfile=args.ssl_ca_certfile,
        supernode_auth=args.supernode_auth, keep=args.keep)
    secure = args.secure_aggregation == "on"
    if (args.privacy == "distributed" and not secure) or (args.privacy == "central" and secure):
        from floe_app.federated.privacy import CENTRAL_NEEDS_UPDATES, NO_SECURE_AGGREGATION

        why = CENTRAL_NEEDS_UPDATES if secure else NO_SECURE_AGGREGATION
        print(f"floe: --privacy {args.privacy}: {why}", file=sys.stderr)
        return 2
    problem = service.superlink_problem(options)
    if problem is not None:
        print(f"floe: {problem}", file=sys.stderr)
        return 2
    if options.host not in service.LOOPBACK and not options.ssl_certfile:
        print("floe: warning: serving beyond this machine without TLS (--ssl-certfile):"
              " updates travel unencrypted", file=sys.stderr)
    operator = service.Operator(options)
    try:
        operator.start_link()
        print(f"SuperLink on {options.host}:{options.port} (state in {options.state_dir});"
              f" devices join with federation.address = {options.host}:{options.port}",
              flush=True)
        run_id = operator.submit()
        print(f"Run {run_id}: {args.rounds} rounds at rank {args.rank}, clip"
              f" {args.clip_norm:g}, secure aggregation {args.secure_aggregation}, privacy"
              f" {args.privacy} (the server's first line says what it chose and why)",
              flush=True)
        status = operator.follow(run_id, lambda line: print(line, flush=True))
        print(f"Run {run_id} {status}", flush=True)
        if not status.startswith("finished:completed"):
            return 1
        if options.keep:
            print("SuperLink kept running; Ctrl+C stops it.", flush=True)
            if operator.link is not None:
                operator.link.wait()
        return 0
    finally:
        operator.stop_link()


# Plugins


def add_plugins(commands: Commands) -> None:
    plugins = command(commands, "plugins", cmd_plugins, "list, install or uninstall plugins")
    actions = plugins.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="installed plugins and their hooks")
    listing.add_argument("--json", action="store_true")
    install = actions.add_parser(
        "install", help="install a plugin (a PyPI name or a path) into Floe's own environment")
    install.add_argument("target", nargs="+", metavar="NAME|PATH")
    uninstall = actions.add_parser("uninstall", help="remove a plugin")
    uninstall.add_argument("name", nargs="+")


def cmd_plugins(args: argparse.Namespace) -> int:
    import subprocess

    if args.plugins_command in ("install", "uninstall"):
        # Floe's own interpreter: under pipx that is Floe's private environment.
        names = args.target if args.plugins_command == "install" else ["--yes", *args.name]
        command = [sys.executable, "-m", "pip", args.plugins_command, "--quiet", *names]
        from floe_app.paths import user_umask

        with user_umask():  # a plugin is code, not the user's data: installed as pip would
            returncode = subprocess.run(command).returncode
        if returncode != 0:
            raise FloeError(f"pip could not {args.plugins_command} {' '.join(names)}")
        return 0
    plugins = load_plugins()
    plugins.commands()  # calling the hooks is what finds a plugin that raises or hangs
    infos = list(plugins.infos.values())
    if args.json:
        print(json.dumps([vars(i) for i in infos]))
        return 0
    if not infos:
        print("No plugins installed. Try: floe plugins install floe-clock")
    for info in infos:
        state = f"DISABLED: {info.error}" if info.error else ", ".join(info.hooks)
        print(f"{info.name} {info.version}  {state}")
    return 0


def run_plugin_command(name: str, words: list[str]) -> int | None:
    """Run `floe NAME ARGS` if a plugin provides NAME; None when none does."""
    plugins = load_plugins()
    if name not in plugins.commands():
        return None
    try:
        session = open_session(argparse.Namespace(model=None), plugins)
        print(session.run_command(None, f"/{name} {' '.join(words)}"))
    except FloeError as exc:
        print(f"floe: error: {one_line(exc, limit=None)}", file=sys.stderr)
        return 1
    return 0


# Doctor


def add_doctor(commands: Commands) -> None:
    doctor = command(commands, "doctor", cmd_doctor,
                     "check the model, the CPU, paths and versions")
    doctor.add_argument("--json", action="store_true")


def cmd_doctor(args: argparse.Namespace) -> int:
    from floe_app.doctor import diagnose, format_report
    from floe_app.paths import resolve_paths

    paths = resolve_paths()
    for note in paths.secure():
        print(f"floe: note: {note}", file=sys.stderr)
    report = diagnose(paths, model_override=args.model)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


# In the order `floe --help` lists them.
COMMANDS = (add_ask, add_history, add_remember, add_memories, add_forget, add_rate, add_correct,
            add_examples, add_train, add_adapters, add_cloud, add_ledger, add_plugins,
            add_private, add_sync, add_federation, add_doctor)
