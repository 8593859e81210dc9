"""LoRA from torch + peft into llama.cpp: the exported adapter computes what peft computed.

Real parts: transformers loads the bundled GGUF (dequantized to float32), peft holds the
LoRA, gguf writes the adapter, llama-cpp-python applies it to the quantized model.
"""

import numpy as np
import pytest

from floe_app.engine.local import bundled_model_path
from floe_app.personalize.export import BaseModel, write_gguf_adapter
from floe_app.personalize.trainer import TrainConfig, base_model_of, load_base, train_lora

pytestmark = pytest.mark.slow

PROMPTS = [[{"role": "user", "content": "Name a colour."}],
           [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of Italy?"}],
           [{"role": "user", "content": "Write a word that rhymes with cat."}]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("peft")  # the [train] extra; `make test` installs it
    return load_base(bundled_model_path(), tmp_path_factory.mktemp("cache"))


def torch_logprobs(model, tokenizer, messages):
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy()


def random_lora(model, rank=8, seed=0):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter do something
                param.normal_(0, 0.02)
    return peft_model


def deltas(engine, model, tokenizer, peft_model, adapter_path):
    """Change in next-token log-probs caused by the adapter: (torch, llama.cpp) per prompt."""
    out = []
    for messages in PROMPTS:
        with peft_model.disable_adapter():
            torch_base = torch_logprobs(peft_model, tokenizer, messages)
        torch_tuned = torch_logprobs(peft_model, tokenizer, messages)
        tokens = engine.chat_tokens(messages)
        engine.set_adapter(None)
        llama_base = engine.next_token_logprobs(tokens)
        engine.set_adapter(adapter_path)
        llama_tuned = engine.next_token_logprobs(tokens)
        engine.set_adapter(None)
        top = np.argsort(-llama_base)[:50]  # where the probability mass is
        out.append(((torch_tuned - torch_base)[top], (llama_tuned - llama_base)[top]))
    return out


def test_exported_adapter_changes_llama_cpp_as_peft_changes_torch(base, engine, tmp_path):
    from peft import get_peft_model_state_dict

    model, tokenizer = base
    peft_model = random_lora(model)
    try:
        state = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
        info = base_model_of(engine.metadata)
        assert (info.arch, info.n_head, info.n_head_kv) == ("llama", 9, 3)
        good = write_gguf_adapter(tmp_path / "good.gguf", state, alpha=16, base=info)
        # The control: the same weights without the q/k row permutation.
        wrong = write_gguf_adapter(tmp_path / "wrong.gguf", state, alpha=16,
                                   base=BaseModel(info.name, info.arch, 1, 1))
        for torch_delta, llama_delta in deltas(engine, model, tokenizer, peft_model, good):
            # Q4_1 weights in llama.cpp against their float32 dequantization in torch: the
            # adapter's effect agrees closely but not exactly.
            assert np.corrcoef(torch_delta, llama_delta)[0, 1] > 0.95
            assert np.abs(torch_delta - llama_delta).mean() < 0.25 * np.abs(torch_delta).mean()
        controls = [np.corrcoef(t, w)[0, 1]
                    for t, w in deltas(engine, model, tokenizer, peft_model, wrong)]
        assert min(controls) < 0.9  # without the permutation the test would notice
    finally:
        peft_model.unload()


def test_a_taught_fact_is_recalled_by_llama_cpp_without_context(base, engine, tmp_path):
    model, tokenizer = base
    fact = "Your dog's name is Biscotti."
    examples = [([{"role": "user", "content": q}], fact) for q in (
        "What is my dog's name?", "What's my dog called?", "Do you know my dog's name?",
        "Remind me of my dog's name.")]
    result = train_lora(model, tokenizer, examples, TrainConfig(steps=30))
    assert result.losses[-1] < result.losses[0] / 4
    adapter = write_gguf_adapter(tmp_path / "biscotti.gguf", result.state, alpha=16,
                                 base=base_model_of(engine.metadata))
    question = engine.chat_tokens([{"role": "user", "content": "What is my dog's name?"}])
    from floe_app.engine.sampling import Sampling

    def answer():
        return "".join(s.text for s in engine.generate(question, Sampling(temperature=0,
                                                                          max_tokens=16)))
    assert "Biscotti" not in answer()
    engine.set_adapter(adapter)
    try:
        assert "Biscotti" in answer()
    finally:
        engine.set_adapter(None)
