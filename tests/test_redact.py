"""Redaction before anything goes to a cloud: hits, near-misses, and restoration."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from floe_app.engine.redact import Redactor, Restorer, iban_valid, luhn_valid, safe_prefix


@pytest.mark.parametrize(("text", "kind"), [
    ("mail me at ada.lovelace+floe@example.co.uk please", "EMAIL"),
    ("call +1 415 555 0100 tonight", "PHONE"),
    ("call (415) 555-0100 tonight", "PHONE"),
    ("call 415-555-0100 tonight", "PHONE"),
    ("London office: +44 20 7946 0958.", "PHONE"),
    ("London office: 020 7946 0958.", "PHONE"),
    ("card 4111 1111 1111 1111 expires", "CARD"),
    ("card 4111-1111-1111-1111 expires", "CARD"),
    ("card 5555555555554444.", "CARD"),
    ("IBAN GB82 WEST 1234 5698 7654 32 for rent", "IBAN"),
    ("IBAN DE89370400440532013000.", "IBAN"),
])
def test_personal_data_is_replaced(text, kind):
    redactor = Redactor()
    redacted = redactor.redact(text)
    assert f"[{kind}_1]" in redacted
    assert redactor.restore(redacted) == text


@pytest.mark.parametrize("text", [
    "Released 2026-11-25 as version 3.11.7",
    "Server at 192.168.1.10 on port 8080",
    "It costs 1,299.00 or 12.50 a month",
    "ISBN 978-3-16-148410-0",
    "card 4111 1111 1111 1112 fails Luhn",
    "IBAN GB82 WEST 1234 5698 7654 33 fails mod 97",
    "meet in room 415 at 10:30",
    "email me at ada at example dot com",
    "the ratio was 3/4 and 22 of 1000",
    "order #1234567",
    "call me at noon",
    "@handle and a@b are not addresses",
])
def test_near_misses_are_left_alone(text):
    assert Redactor().redact(text) == text


def test_user_terms_whole_words_case_insensitive_longest_first():
    redactor = Redactor(terms=["Biscotti", "Ada Lovelace", "Ada"])
    text = "biscotti is Ada Lovelace's dog; Ada walks Biscotti. Biscottis and Adam differ."
    redacted = redactor.redact(text)
    assert redacted == ("[TERM_1] is [TERM_2]'s dog; [TERM_3] walks [TERM_1]."
                        " Biscottis and Adam differ.")
    assert redactor.restore(redacted).startswith("biscotti is Ada Lovelace's dog; Ada walks"
                                                 " biscotti.")  # first-seen spelling


def test_same_value_same_placeholder_across_calls():
    redactor = Redactor()
    first = redactor.redact("write to bob@example.com")
    second = redactor.redact("again bob@example.com and eve@example.org")
    assert first.endswith("[EMAIL_1]") and second == "again [EMAIL_1] and [EMAIL_2]"


@given(st.lists(st.text(max_size=6), max_size=12))
def test_streamed_restoration_equals_restoring_the_whole(chunks):
    redactor = Redactor()
    redactor.redact("bob@example.com and +1 415 555 0100")
    chunks = [*chunks, "[EMAIL_1] ", "[PH", "ONE_1]", " [unknown_9] ["]
    restorer = Restorer(redactor)
    streamed = "".join(restorer.feed(c) for c in chunks) + restorer.flush()
    assert streamed == redactor.restore("".join(chunks))


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB82WEST12345698765433")


def test_safe_prefix_holds_back_partial_words_and_numbers():
    assert safe_prefix("Her number is +1 415 55") == "Her number is "
    assert safe_prefix("Write to bob@exa") == "Write to "
    assert safe_prefix("Hello there, friend") == "Hello there, "
    assert safe_prefix("Hello") == ""
    assert safe_prefix("Card: 4111 1111 1111 ") == "Card: "


def test_private_note_words_missing_from_the_public_text_become_terms():
    from floe_app.engine.redact import private_terms

    notes = ["The user's dog is named Biscotti.", "The user works as a nurse in Lisbon."]
    terms = private_terms(notes, "What is my dog's name? I work in Lisbon")
    assert terms == ["Biscotti", "nurse"]
    redactor = Redactor(secrets=terms)
    assert redactor.redact("Your dog Biscotti, a nurse's friend; Biscottis, NURSEry") == \
        "Your dog [TERM_1], a [TERM_2]'s friend; [TERM_1]s, [TERM_2]ry"  # even inside words
