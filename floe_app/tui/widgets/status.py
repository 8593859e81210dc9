"""The line at the bottom: model, mode, and how fast the last reply came."""

from __future__ import annotations

from typing import Any

from textual.reactive import reactive
from textual.widgets import Static


class StatusBar(Static):
    model: reactive[str] = reactive("no model")
    mode: reactive[str] = reactive("local")
    state: reactive[str] = reactive("")
    learning: reactive[str] = reactive("")  # a background training job's progress
    last_stats: reactive[dict[str, Any]] = reactive(dict, always_update=True)

    def render(self) -> str:
        parts = [self.model, self.mode]
        stats = self.last_stats
        if stats:
            parts.append(f"{stats.get('tokens_per_s', 0):.1f} tok/s")
            parts.append(f"first token {stats.get('ttft_ms', 0):.0f} ms")
            parts.append(f"{stats.get('tokens', 0)} tokens")
            cloud = stats.get("cloud")
            if cloud and stats.get("mode") == "fused":
                if cloud.get("private_from", -1) >= 0:
                    parts.append("private: the cloud was left out")
                parts.append(f"cloud agreed {cloud['agreed']:.0%} fused {cloud['fused']:.0%}"
                             f" absent {cloud['absent']:.0%}, {cloud['requests']} requests")
                batches = cloud.get("batches") or {}
                if batches.get("count"):
                    parts.append(f"{batches['accepted']:.0%} from batches")
        if self.learning:
            parts.append(self.learning)
        if self.state:
            parts.append(self.state)
        return "  ·  ".join(parts)
