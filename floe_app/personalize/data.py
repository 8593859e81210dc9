"""What the local model learns from, built from the store. Pure: no I/O, no torch.

Memory notes become several questions with answers (and a statement form), so the model
learns the fact rather than one sentence; one question per fact is held out for the
evaluation gate. Accepted replies are learned as they were, corrected ones with the
correction as the target; thumbs-down replies without a correction are never learned.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field

from floe_app.store.db import TaughtReply

SOURCES = ("memory", "accepted", "correction")

# First person to second person, word by word (the answer speaks to the user).
_PRONOUNS = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself",
             "i'm": "you're", "i've": "you've", "i'll": "you'll", "i'd": "you'd",
             "am": "are", "was": "were"}
_WORD = re.compile(r"[A-Za-z']+")

# (pattern over the note, question forms, answer form); the last question is held out.
_FACTS: list[tuple[re.Pattern[str], tuple[str, ...], str]] = [
    (re.compile(r"^my (?P<thing>.+?) (?P<verb>is|are) (?P<value>.+?)\.?$", re.I),
     ("What {verb} my {thing}?", "Do you know what my {thing} {verb}?",
      "Remind me, what {verb} my {thing}?", "Tell me my {thing}."),
     "Your {thing} {verb} {value}."),
    (re.compile(r"^i live in (?P<value>.+?)\.?$", re.I),
     ("Where do I live?", "Do you know where I live?", "Which place do I live in?",
      "Remind me where I live."),
     "You live in {value}."),
    (re.compile(r"^i work (?P<prep>at|for) (?P<value>.+?)\.?$", re.I),
     ("Where do I work?", "Do you know where I work?", "Who is my employer?",
      "Remind me where I work."),
     "You work {prep} {value}."),
    (re.compile(r"^i(?:'m| am) allergic to (?P<value>.+?)\.?$", re.I),
     ("What am I allergic to?", "Do I have any allergies?", "Which allergy do I have?",
      "Remind me what I am allergic to."),
     "You are allergic to {value}."),
    (re.compile(r"^(?:call me|people call me) (?P<value>.+?)\.?$", re.I),
     ("What should you call me?", "How do I like to be called?", "What is my nickname?",
      "Remind me what you call me."),
     "I call you {value}."),
]
_GENERAL_FORMS = (("What do you remember about me?", "You told me: {fact}"),
                  ("Remember this: {note}", "Noted: {fact}"))


@dataclass(frozen=True)
class Example:
    source: str  # one of SOURCES
    source_id: int  # memory note id or message id
    prompt: str
    answer: str


@dataclass(frozen=True)
class RecallQuestion:
    """A held-out question about a remembered fact; right if the answer contains `expected`."""

    memory_id: int
    question: str
    expected: str

    def is_recalled_by(self, answer: str) -> bool:
        return self.expected.casefold() in answer.casefold()


@dataclass
class Dataset:
    examples: list[Example] = field(default_factory=list)
    heldout: list[RecallQuestion] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """Changes exactly when what would be learned changes (order does not matter)."""
        items = sorted(json.dumps([e.source, e.prompt, e.answer]) for e in self.examples)
        return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]

    def by_source(self) -> dict[str, list[Example]]:
        return {s: [e for e in self.examples if e.source == s] for s in SOURCES}


def second_person(text: str) -> str:
    """'My dog is called Rex' -> 'Your dog is called Rex'; other scripts pass unchanged."""
    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        new = _PRONOUNS.get(word.lower())
        if new is None:
            return word
        return new[0].upper() + new[1:] if word[0].isupper() else new
    return _WORD.sub(swap, text)


def _clean(text: str) -> str:
    return " ".join(text.split())


def memory_examples(memory_id: int, note: str) -> tuple[list[Example], list[RecallQuestion]]:
    """Training forms of one note, and its held-out recall question (if it states a fact)."""
    note = _clean(note)
    if not note:
        return [], []
    fact = second_person(note)
    if "a" <= fact[0] <= "z":  # other scripts' first letters stay as the user wrote them
        fact = fact[0].upper() + fact[1:]
    # Any script's sentence end (。 ؟ ...) is kept; only an unterminated fact gets a period.
    fact = fact if unicodedata.category(fact[-1]).startswith("P") else fact + "."
    pairs = [(q.format(note=note), a.format(fact=fact)) for q, a in _GENERAL_FORMS]
    heldout = []
    for pattern, questions, answer in _FACTS:
        match = pattern.match(note)
        if match is None:
            continue
        groups = match.groupdict()
        verb, thing = (groups.get("verb") or "is").lower(), groups.get("thing") or ""
        asked = {"verb": verb, "thing": thing}
        # The asker's "my" is the answer's "your"; the value keeps the user's own words.
        answer_text = answer.format(verb=verb, thing=second_person(thing),
                                    value=groups["value"], prep=groups.get("prep") or "")
        pairs += [(q.format(**asked), answer_text) for q in questions[:-1]]
        expected = " ".join(groups["value"].split()[:4]).rstrip(".,;:!?")
        heldout.append(RecallQuestion(memory_id, questions[-1].format(**asked), expected))
        break
    return [Example("memory", memory_id, q, a) for q, a in pairs], heldout


def reply_example(reply: TaughtReply) -> Example | None:
    question, target = _clean(reply.question), (reply.correction or "").strip()
    if not question:
        return None
    if target:
        return Example("correction", reply.message_id, question, target)
    if reply.rating == 1 and reply.reply.strip():
        return Example("accepted", reply.message_id, question, reply.reply.strip())
    return None


def build_dataset(memories: list[tuple[int, str]], replies: list[TaughtReply]) -> Dataset:
    """Every example the model learns from, deduplicated, and the held-out questions."""
    dataset, seen = Dataset(), set()
    candidates: list[Example] = []
    for memory_id, note in memories:
        examples, heldout = memory_examples(memory_id, note)
        candidates += examples
        dataset.heldout += heldout
    candidates += [e for e in map(reply_example, replies) if e is not None]
    for example in candidates:
        key = (_clean(example.prompt).casefold(), _clean(example.answer).casefold())
        if key not in seen:
            seen.add(key)
            dataset.examples.append(example)
    return dataset
