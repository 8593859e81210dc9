"""Start-up cost of plugins: `floe --version` and the TUI becoming interactive, with both
example plugins installed, against the same with plugins switched off (FLOE_PLUGINS=).

Each figure is the median of several fresh processes. TUI start is measured in a child
process from interpreter start until the app has mounted (headless, then it exits).

    .venv/bin/python -m benchmarks.startup [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

TUI_START = """
import asyncio, time
start = time.perf_counter()
from floe_app.config import load_config
from floe_app.paths import resolve_paths
from floe_app.session import ChatSession
from floe_app.tui.app import FloeApp

async def main():
    paths = resolve_paths().ensure()
    app = FloeApp(ChatSession.open(paths, load_config(paths)[0]))
    async with app.run_test() as pilot:
        await pilot.pause()
        print((time.perf_counter() - start) * 1000)

asyncio.run(main())
"""


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return (time.perf_counter() - start) * 1000


def tui_ms(env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", TUI_START], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="floe-startup-")
    floe = [sys.executable, "-m", "floe_app", "--version"]
    rows = []
    for label, plugins in (("no plugins", {"FLOE_PLUGINS": ""}), ("both plugins", {})):
        env = {k: v for k, v in os.environ.items() if k != "FLOE_PLUGINS"}
        env.update(FLOE_HOME=home, **plugins)
        version = statistics.median(timed(floe, env) for _ in range(args.reps))
        tui = statistics.median(tui_ms(env) for _ in range(args.reps))
        rows.append((label, version, tui))
    print(f"Start-up, median of {args.reps} fresh processes (ms)")
    print(f"{'':<14}{'floe --version':>16}{'TUI mounted':>14}")
    for label, version, tui in rows:
        print(f"{label:<14}{version:>16.1f}{tui:>14.1f}")
    print(f"{'ratio':<14}{rows[1][1] / rows[0][1]:>15.2f}x{rows[1][2] / rows[0][2]:>13.2f}x")


if __name__ == "__main__":
    main()
