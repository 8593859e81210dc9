"""What the cloud must not see: personal data replaced by placeholders, restored on return.

Pure text functions. Card numbers must pass the Luhn check and IBANs the mod-97 check, so
that order numbers, dates and versions are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                   r"\.[A-Za-z]{2,}(?![\w-])")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
IBAN = re.compile(r"(?<!\w)[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}(?!\w)")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"  # +44 20 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]?\d{4}"  # (415) 555-0100
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 415-555-0100
    r"|0\d{2,4} \d{3,4} ?\d{3,4}"  # 020 7946 0958
    r")(?![\w-])")
PLACEHOLDER = re.compile(r"\[(EMAIL|PHONE|CARD|IBAN|TERM)_(\d{1,4})\]")
PLACEHOLDER_MAX = 16  # longest placeholder text, for holding back a partial one


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


@dataclass
class Redactor:
    """Replaces personal data with stable placeholders: the same value, the same placeholder."""

    terms: list[str] = field(default_factory=list)  # whole words, any case
    secrets: list[str] = field(default_factory=list)  # anywhere, even inside a word
    patterns: list[re.Pattern[str]] = field(default_factory=list)  # from plugins
    placeholders: dict[str, str] = field(default_factory=dict)  # original -> placeholder
    originals: dict[str, str] = field(default_factory=dict)  # placeholder -> first seen form

    def _rules(self) -> list[tuple[str, re.Pattern[str], Callable[[str], bool]]]:
        rules = [
            ("EMAIL", EMAIL, lambda s: True),
            ("IBAN", IBAN, iban_valid),
            ("CARD", CARD, luhn_valid),
            ("PHONE", PHONE, lambda s: 7 <= _digits(s) <= 15),
        ]
        rules += [("TERM", pattern, lambda s: bool(s)) for pattern in self.patterns]
        for values, edge in ((self.terms, r"(?<!\w)", ), (self.secrets, "")):
            words = sorted((re.escape(t.strip()) for t in values if t.strip()), key=len,
                           reverse=True)  # longest first: "Ada Lovelace" before "Ada"
            if words:
                tail = r"(?!\w)" if edge else ""
                pattern = re.compile(edge + "(?:" + "|".join(words) + ")" + tail, re.IGNORECASE)
                rules.insert(0, ("TERM", pattern, lambda s: True))
        return rules

    def _placeholder(self, kind: str, original: str) -> str:
        key = original.casefold() if kind == "TERM" else original
        if key not in self.placeholders:
            count = sum(p.startswith(f"[{kind}_") for p in self.placeholders.values())
            self.placeholders[key] = f"[{kind}_{count + 1}]"
            self.originals[self.placeholders[key]] = original
        return self.placeholders[key]

    def redact(self, text: str) -> str:
        for kind, pattern, valid in self._rules():
            text = pattern.sub(
                lambda m, kind=kind, valid=valid: (self._placeholder(kind, m.group())
                                                   if valid(m.group()) else m.group()),
                text)
        return text

    def restore(self, text: str) -> str:
        return PLACEHOLDER.sub(lambda m: self.originals.get(m.group(), m.group()), text)


class Restorer:
    """Restores placeholders in streamed text, holding back what may be half a placeholder."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.pending = ""

    def feed(self, text: str) -> str:
        self.pending += text
        cut = self.pending.rfind("[")
        if cut >= 0 and len(self.pending) - cut < PLACEHOLDER_MAX and "]" not in self.pending[cut:]:
            ready, self.pending = self.pending[:cut], self.pending[cut:]
        else:
            ready, self.pending = self.pending, ""
        return self.redactor.restore(ready)

    def flush(self) -> str:
        ready, self.pending = self.pending, ""
        return self.redactor.restore(ready)


def safe_prefix(text: str) -> str:
    """The part of a reply prefix that may be sent: complete words only, and no trailing
    run of digits (a card or phone number still being written is not yet recognisable)."""
    cut = max(text.rfind(" "), text.rfind("\n"))
    head = text[: cut + 1] if cut >= 0 else ""
    match = re.search(r"[\d+(][\d\s().+-]*$", head)
    return head[: match.start()] if match else head


# Words too common to identify anyone; kept out of the terms derived from private notes.
COMMON_WORDS = frozenset({
    "a", "about", "above", "after", "again", "all", "also", "am", "an", "and", "any", "are",
    "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but",
    "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few",
    "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers",
    "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "like",
    "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on",
    "once", "only", "or", "other", "our", "ours", "out", "over", "own", "same", "she",
    "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "then",
    "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up",
    "user", "user's", "users", "very", "was", "we", "were", "what", "when", "where", "which",
    "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours",
    "yourself", "called", "named", "name", "lives", "live", "works", "work",
    "drives", "drive", "favourite", "favorite",
})


def private_terms(notes: list[str], public_text: str) -> list[str]:
    """Words of the user's private notes that the public conversation does not contain.

    The local model may repeat them in its reply, and the reply so far is sent to the cloud
    to continue; these are redacted there like user-listed terms.
    """
    public = {w.casefold() for w in re.findall(r"\w+", public_text)}
    terms: list[str] = []
    for note in notes:
        for word in re.findall(r"\w[\w'-]*\w|\w", note):
            key = word.casefold()
            if (len(word) >= 3 and key not in COMMON_WORDS and key not in public
                    and key not in (t.casefold() for t in terms)):
                terms.append(word)
    return terms
