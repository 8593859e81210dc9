"""Every shape of streamed log-probabilities Floe meets, and never a certainty it invents.

Servers that run here (llama-cpp-python's) are exercised in test_cloud_fusion.py and
test_probe.py; these chunks are written from the providers' documented examples for the
shapes no local server produces: OpenAI's chat and legacy completions (including its
`bytes:\\x..` tokens), vLLM's U+FFFD for a token that splits a character, llama.cpp's
server echoing a prefilled reply, Together's number-plus-dict, TGI's empty alternatives,
and a stream with no log-probabilities at all.
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from floe_app.engine.logprobs import (
    MalformedChunk,
    ParsedChunk,
    ParsedToken,
    TokenAssembler,
    parse_chunk,
    token_bytes,
)
from floe_app.engine.probe import PARTIAL, continues
from floe_app.engine.profiles import (
    CONTINUE_FINAL,
    NONE,
    PRESETS,
    RAW_PROMPT,
    CloudProfile,
    ProfileCache,
    guess_prompt_format,
    preset_for,
    render_prompt,
    with_settings,
)


def chat_chunk(content, items=None, finish=None):
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish,
              "logprobs": None if items is None else {"content": items}}
    return {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}


def item(token, logprob, top=(), raw=None):
    entry = {"token": token, "logprob": logprob,
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                              for t, lp in top]}
    if raw is not None:
        entry["bytes"] = raw
    return entry


def assemble(chunks, echo=b""):
    assembler = TokenAssembler(echo=echo)
    tokens = []
    for chunk in chunks:
        parsed = parse_chunk(chunk)
        if parsed is not None:
            tokens += assembler.feed(parsed)
    return tokens + assembler.finish(), assembler


def test_openai_chat_content_list():
    tokens, assembler = assemble([
        chat_chunk("", None),  # the role chunk
        chat_chunk(" Paris", [item(" Paris", -0.01, [(" Paris", -0.01), (" Lyon", -5.2)])]),
        chat_chunk(".", [item(".", -0.2, [(".", -0.2), ("!", -1.9)])], finish="stop")])
    assert [t.text for t in tokens] == [b" Paris", b"."]
    assert tokens[0].top == ((b" Paris", -0.01), (b" Lyon", -5.2))
    assert assembler.saw_alternatives and assembler.merged == 0


def test_legacy_completions_with_openai_bytes_tokens():
    # U+2019 split over two tokens, written the way OpenAI's legacy API writes them.
    chunk = {"choices": [{"text": "It\u2019s", "index": 0, "finish_reason": None, "logprobs": {
        "tokens": ["It", "bytes:\\xe2\\x80", "bytes:\\x99", "s"],
        "token_logprobs": [-0.1, -0.3, -0.01, -0.05],
        "top_logprobs": [{"It": -0.1, "This": -2.5}, {"bytes:\\xe2\\x80": -0.3}, {}, {"s": -0.05}],
        "text_offset": [0, 2, 2, 3]}}]}
    tokens, assembler = assemble([chunk])
    assert [t.text for t in tokens] == [b"It", b"\xe2\x80", b"\x99", b"s"]
    assert tokens[1].top == ((b"\xe2\x80", -0.3),)
    assert assembler.merged == 0


def test_vllm_replacement_characters_are_merged_with_the_text_that_shows_them():
    # vLLM streams "😀" as two tokens printed "\ufffd", holding the text back until whole.
    tokens, assembler = assemble([
        chat_chunk("Hi ", [item("Hi", -0.1, [("Hi", -0.1)]), item(" ", -0.2, [(" ", -0.2)])]),
        chat_chunk("", [item("\ufffd", -0.5, [("\ufffd", -0.5), ("\ufffd", -1.0)])]),
        chat_chunk("😀", [item("\ufffd", -0.05)]),
        chat_chunk(" there", [item(" there", -0.3, [(" there", -0.3)])], finish="stop")])
    assert [t.text for t in tokens] == [b"Hi", b" ", "😀".encode(), b" there"]
    emoji = tokens[2]
    assert emoji.top == () and emoji.logprob == pytest.approx(-0.55)  # no invented rivals
    assert assembler.merged == 2


def test_bytes_field_beats_the_replacement_character():
    tokens, _ = assemble([chat_chunk("", [item("\ufffd", -0.4, raw=[0xF0, 0x9F])]),
                          chat_chunk("😀", [item("\ufffd", -0.1, raw=[0x98, 0x80])])])
    assert [t.text for t in tokens] == [b"\xf0\x9f", b"\x98\x80"]


def test_llama_server_echoes_the_prefill_in_its_first_delta():
    prefix = "The capital of France is"
    tokens, _ = assemble([
        chat_chunk(prefix + " Paris", [item(" Paris", -0.02, [(" Paris", -0.02)])]),
        chat_chunk(".", [item(".", -0.1, [(".", -0.1)])])], echo=prefix.encode())
    assert b"".join(t.text for t in tokens) == b" Paris."
    assert tokens[0].top == ((b" Paris", -0.02),)


def test_together_number_plus_dict():
    chunk = {"choices": [{"index": 0, "text": " Paris", "logprobs": -0.03,
                          "top_logprobs": {" Paris": -0.03, " Lyon": -4.0},
                          "delta": {"content": " Paris", "token_id": 6342}}]}
    tokens, assembler = assemble([chunk])
    assert tokens[0].text == b" Paris" and tokens[0].logprob == -0.03
    assert dict(tokens[0].top) == {b" Paris": -0.03, b" Lyon": -4.0}
    assert assembler.saw_logprobs


def test_tgi_empty_alternatives_keep_the_chosen_probability_only():
    tokens, assembler = assemble([chat_chunk("Deep", [item("Deep", -0.0015)])])
    assert tokens[0].logprob == -0.0015 and tokens[0].top == ()
    assert assembler.saw_logprobs and not assembler.saw_alternatives


def test_text_without_log_probabilities_is_text_with_nothing_known():
    tokens, assembler = assemble([chat_chunk("Hello"), chat_chunk(" world", finish="stop")])
    assert [(t.text, t.logprob, t.top) for t in tokens] == [(b"Hello", None, ()),
                                                            (b" world", None, ())]
    assert not assembler.saw_logprobs


def test_end_of_turn_token_without_text_is_dropped():
    tokens, _ = assemble([chat_chunk(".", [item(".", -0.1)]),
                          chat_chunk("", [item("<|im_end|>", -0.01)], finish="stop")])
    assert [t.text for t in tokens] == [b"."]


@pytest.mark.parametrize("chunk", [
    [], "data", {"choices": "x"}, {"choices": [3]}, {"choices": [{"delta": {"content": 5}}]},
    {"choices": [{"text": "a", "logprobs": {"tokens": "abc"}}]},
    {"choices": [{"text": "a", "logprobs": "high"}]},
    {"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [1]}}]},
])
def test_malformed_chunks_are_refused_in_one_line(chunk):
    with pytest.raises(MalformedChunk) as err:
        parse_chunk(chunk)
    assert "\n" not in str(err.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["choices", "delta", "content", "text", "logprobs", "token",
                         "tokens", "top_logprobs", "token_logprobs", "bytes", "logprob",
                         "finish_reason", "error"]), inner, max_size=5),
    max_leaves=30)


@given(st.lists(json_values, max_size=6))
def test_any_json_chunk_sequence_parses_or_is_refused_never_crashes(chunks):
    assembler = TokenAssembler()
    streamed = b""
    emitted = b""
    for chunk in chunks:
        try:
            parsed = parse_chunk(chunk)
        except MalformedChunk:
            continue
        if parsed is None:
            continue
        streamed += parsed.text
        emitted += b"".join(t.text for t in assembler.feed(parsed))
    emitted += b"".join(t.text for t in assembler.finish())
    assert emitted == streamed  # nothing invented, nothing lost


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=6), st.floats(-30, 0),
                          st.booleans()), min_size=1, max_size=12))
def test_assembled_bytes_always_equal_the_streamed_text(pieces):
    """Tokens with known or unknown (U+FFFD) bytes, each in its own chunk: what comes out
    is exactly the text, and every token with alternatives is one the server stated."""
    assembler = TokenAssembler()
    out = []
    text = b""
    for data, logprob, known in pieces:
        text += data
        token = ParsedToken(data if known else None, logprob, ((data, logprob),) if known else ())
        out += assembler.feed(ParsedChunk(data, (token,)))
    out += assembler.finish()
    assert b"".join(t.text for t in out) == text
    stated = {data for data, _, known in pieces if known}
    assert all(t.text in stated for t in out if t.top)


def test_token_bytes_shapes():
    assert token_bytes("abc") == b"abc"
    assert token_bytes("bytes:\\xe2\\x82") == b"\xe2\x82"
    assert token_bytes("x\ufffd") is None
    assert token_bytes("\ufffd", [0xE2]) == b"\xe2"
    assert token_bytes("bytes: not escapes") == b"bytes: not escapes"


# Profiles

def test_presets_say_what_each_server_does():
    assert PRESETS["openai"].continuation == NONE and PRESETS["openai"].top_k == 20
    assert PRESETS["vllm"].extra == {"continue_final_message": True,
                                     "add_generation_prompt": False}
    assert PRESETS["tgi"].top_k == 5 and not PRESETS["groq"].fusable
    assert preset_for("auto", "https://api.openai.com/v1").source == "preset openai"
    assert preset_for("auto", "http://127.0.0.1:8080/v1") is None
    assert preset_for("ollama", "http://localhost:11434/v1").continuation == "prefill"


def test_settings_override_the_profile():
    openai = PRESETS["openai"]
    assert with_settings(openai, "auto", "auto", "auto", "gpt-4o-mini", 20) == openai
    assert with_settings(openai, "auto", "auto", "auto", "gpt-4o-mini", 5).top_k == 5
    raw = with_settings(openai, "completions", "auto", "auto", "Qwen2.5-1.5B-Instruct", 20)
    assert (raw.endpoint, raw.continuation, raw.prompt_format) == ("completions", RAW_PROMPT,
                                                                   "chatml")
    vllm = with_settings(openai, "auto", CONTINUE_FINAL, "auto", "m", 20)
    assert vllm.endpoint == "chat" and vllm.extra["continue_final_message"] is True
    local = with_settings(PRESETS["llama-cpp-python"], "auto", "auto", "auto",
                          "gemma-3-270m", 20)
    assert local.prompt_format == "transcript"


def test_prompt_formats():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"}]
    assert render_prompt("chatml", messages, "The capital is").endswith(
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nThe capital is")
    gemma = render_prompt("gemma", messages, "")
    assert gemma.startswith("<start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>")
    assert gemma.endswith("<start_of_turn>model\n")
    assert render_prompt("llama3", messages, "x").endswith("<|end_header_id|>\n\nx")
    assert render_prompt("transcript", messages, "").endswith(
        "User: Capital of France?\nAssistant:")
    assert guess_prompt_format("Qwen2.5-Coder-1.5B-Instruct") == "chatml"
    assert guess_prompt_format("gemma-3-270m-it") == "gemma"
    assert guess_prompt_format("gemma-3-270m") == "transcript"
    assert guess_prompt_format("Meta-Llama-3.1-8B-Instruct") == "llama3"


def test_continuation_check_tells_an_echo_from_a_new_answer():
    assert continues(" Paris.")
    assert continues(PARTIAL + " Paris")  # llama.cpp's server echoes the prefill
    assert not continues("Paris is the capital of France.")
    assert not continues("The capital of France is Paris.")
    assert not continues(" the city of Paris")


def test_profile_cache_round_trip_and_damage(tmp_path):
    cache = ProfileCache(tmp_path / "profiles.json")
    profile = CloudProfile("chat", NONE, 20, source="probe", notes=("seen",))
    cache.put("http://x/v1/", "m", profile)
    assert cache.get("http://x/v1", "m") == CloudProfile(
        "chat", NONE, 20, source="probe", notes=("seen",),
        probed_at=cache.get("http://x/v1", "m").probed_at)
    data = json.loads(cache.path.read_text())
    data["http://x/v1|m"]["continuation"] = "sideways"
    cache.path.write_text(json.dumps(data))
    assert cache.get("http://x/v1", "m") is None  # damaged: probed again
    cache.path.write_text("not json")
    assert cache.get("http://x/v1", "m") is None
    cache.put("http://x/v1", "m", None)
