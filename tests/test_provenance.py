"""Provenance spans of a fused reply: kept exactly, shown tinted or tagged."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from floe_app.engine.provenance import SOURCES, extend, render, shares, stretches

sources = st.sampled_from(sorted(SOURCES))
pieces = st.lists(st.tuples(st.text(max_size=6), sources), max_size=30)


def spans_of(parts):
    spans = []
    for text, source in parts:
        extend(spans, len(text), source)
    return spans


@given(pieces)
def test_spans_cut_the_reply_back_into_what_each_source_wrote(parts):
    text = "".join(t for t, _ in parts)
    spans = spans_of(parts)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(spans))  # neighbours merged
    assert sum(n for n, _ in spans) == len(text)
    cut = stretches(text, spans)
    assert "".join(piece for piece, _ in cut) == text
    # Character for character, each stretch has the source that wrote it.
    written = "".join(source[0] * len(t) for t, source in parts)
    assert "".join(source[0] * len(piece) for piece, source in cut) == written
    if text:
        assert abs(sum(shares(spans).values()) - 1) < 1e-9


@given(st.text(max_size=40), st.lists(st.tuples(st.integers(-3, 50), st.text(max_size=9))))
def test_stored_spans_that_do_not_fit_the_text_never_lose_or_invent_text(text, spans):
    cut = stretches(text, [list(s) for s in spans])
    assert "".join(piece for piece, _ in cut) == text
    assert all(source in SOURCES for _, source in cut)


def test_render_tags_or_tints_the_clouds_part_and_leaves_the_local_plain():
    spans = spans_of([("The capital is ", "local"), ("Canberra", "overruled"), (".", "agreed")])
    text = "The capital is Canberra."
    assert render(text, spans, colour=False) == ("The capital is [overruled: Canberra]"
                                                 "[agreed: .]")
    tinted = render(text, spans, colour=True)
    assert tinted.startswith("The capital is \x1b[33mCanberra\x1b[0m")
    assert "\x1b[32m.\x1b[0m" in tinted
