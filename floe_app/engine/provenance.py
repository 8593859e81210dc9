"""Where each stretch of a fused reply came from: (characters, source) spans. Pure.

The fused decoder knows for every token whether the local model wrote it alone, the cloud
agreed, fusion overruled the local choice, or it was the cloud's text accepted in a batch.
Kept with the reply (in its stats), shown by `floe history show --provenance` and the
chat's provenance tint: how a user learns what the cloud is worth to them.
"""

from __future__ import annotations

# In the order a legend lists them; the words are the legend's.
SOURCES = {
    "local": "the local model alone",
    "private": "the local model: the reply drew on your private context",
    "agreed": "the cloud agreed with the local model",
    "overruled": "fusion overruled the local model",
    "batch": "the cloud's text, checked in a batch",
}

Spans = list[list]  # [[characters, source], ...]: JSON-friendly, as stored


def extend(spans: Spans, chars: int, source: str) -> None:
    """Add `chars` characters from `source`, merged into the last span if it is the same."""
    if chars <= 0:
        return
    if spans and spans[-1][1] == source:
        spans[-1][0] += chars
    else:
        spans.append([chars, source])


def stretches(text: str, spans: Spans) -> list[tuple[str, str]]:
    """`text` cut into (stretch, source) by `spans`; text past the spans is "local" and
    spans past the text are dropped (a stored reply may have been cut short)."""
    out: list[tuple[str, str]] = []
    at = 0
    for chars, source in spans:
        piece = text[at:at + max(0, int(chars))]
        if piece:
            out.append((piece, source if source in SOURCES else "local"))
        at += len(piece)
    if at < len(text):
        out.append((text[at:], "local"))
    return out


def shares(spans: Spans) -> dict[str, float]:
    """Each source's share of the characters, for a one-line summary."""
    total = sum(chars for chars, _ in spans)
    counts: dict[str, int] = {}
    for chars, source in spans:
        counts[source] = counts.get(source, 0) + chars
    return {source: counts[source] / total for source in SOURCES if counts.get(source)}


# ANSI colours for a terminal; "local" stays plain so the cloud's part stands out.
COLOURS = {"local": "", "private": "35", "agreed": "32", "overruled": "33", "batch": "36"}


def render(text: str, spans: Spans, colour: bool) -> str:
    """The reply with each stretch tinted (ANSI) or, without colour, tagged [source: ...]."""
    out = []
    for piece, source in stretches(text, spans):
        if colour:
            code = COLOURS[source]
            out.append(f"\x1b[{code}m{piece}\x1b[0m" if code else piece)
        else:
            out.append(piece if source == "local" else f"[{source}: {piece}]")
    return "".join(out)


def legend(colour: bool) -> str:
    """One line naming each source as `render` shows it."""
    parts = []
    for source, words in SOURCES.items():
        code = COLOURS[source]
        name = f"\x1b[{code}m{source}\x1b[0m" if colour and code else source
        parts.append(f"{name} = {words}")
    return "; ".join(parts)
