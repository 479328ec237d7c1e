"""Checkpoint loading and export: HF / PEFT round trips through transformers and peft, dtype
casting, tokenizers, the GGUF path, and a clear error for each bad input."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_tiny import (
    LLAMA3_ROPE,
    VOCAB,
    WIDTH,
    decoder_terms,
    f32_atol,
    hf_config,
    hf_logits,
    hf_model,
    padded_batch,
    save,
    word_tokenizer,
)
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gxpo.models import (
    PRESETS,
    config_from_hf,
    config_to_hf,
    decode,
    export_merged,
    export_peft_adapter,
    load_pretrained,
    prefill,
)
from gxpo.models.gguf import smollm2_gguf_path

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomize_adapters(model, seed=0):
    for i, name in enumerate(model.config.lora_targets):
        b = getattr(model.layers, name).lora_b
        b.value = 0.2 * jax.random.normal(jax.random.key(seed + i), b.value.shape)


@pytest.mark.parametrize(
    "arch, tie, rope_scaling",
    [("llama", False, LLAMA3_ROPE), ("qwen2", True, None)],
    ids=["llama3-rope-untied", "qwen2-tied"],
)
def test_merged_export_loads_in_transformers(tmp_path, arch, tie, rope_scaling):
    ref_model = hf_model(hf_config(arch, tie=tie, rope_scaling=rope_scaling))
    model, _ = load_pretrained(save(ref_model, tmp_path / "in"), lora_rank=4)
    _randomize_adapters(model)
    tokens, mask = padded_batch((0, 6), 24)
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    assert np.abs(ours - hf_logits(ref_model, tokens, mask)).max() > 1e-2  # adapters matter

    out = export_merged(model, tmp_path / "merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32
    ).eval()
    real = mask.astype(bool)
    # Parity with torch in float32: the rounding allowance of a 2-layer decoder (hf_tiny).
    atol = f32_atol(np.abs(ours[real]).max(), decoder_terms(2, WIDTH))
    assert np.abs(hf_logits(exported, tokens, mask) - ours)[real].max() < atol

    out16 = export_merged(model, tmp_path / "merged16", dtype="bfloat16")
    with safe_open(str(out16 / "model.safetensors"), framework="numpy") as f:
        names = f.keys()  # a safe_open handle is not iterable
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
        assert ("lm_head.weight" in names) == (not tie)
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_peft_adapter_loads_onto_the_base(tmp_path):
    ref_model = hf_model(hf_config("llama", tie=True, rope_scaling=LLAMA3_ROPE))
    path = save(ref_model, tmp_path / "base")
    model, _ = load_pretrained(path, lora_rank=3, lora_alpha=5.0, lora_targets=ALL_TARGETS)
    _randomize_adapters(model)
    out = export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=path)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 3 and adapter_config["lora_alpha"] == 5.0
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    tokens, mask = padded_batch((0, 6), 24)
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    # Parity with torch in float32: the rounding allowance of a 2-layer decoder (hf_tiny).
    atol = f32_atol(np.abs(ours[real]).max(), decoder_terms(2, WIDTH))
    assert np.abs(hf_logits(peft_model, tokens, mask) - ours)[real].max() < atol


def test_bfloat16_checkpoint_is_cast_on_load(tmp_path):
    ref_model = hf_model(hf_config("qwen2", tie=True)).to(torch.bfloat16)
    path = save(ref_model, tmp_path)
    model, _ = load_pretrained(path)  # float32 by default
    q = model.layers.q_proj.kernel.value
    assert q.dtype == jnp.float32 and q.shape == (2, 64, 4, 16)
    hf_q = ref_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(q[1].reshape(64, 64).T, hf_q)
    hf_bias = ref_model.model.layers[0].self_attn.k_proj.bias.detach().float().numpy()
    np.testing.assert_array_equal(model.layers.k_proj.bias.value[0].reshape(-1), hf_bias)


def test_tokenizer_is_loaded_and_exported(tmp_path):
    ref_model = hf_model(hf_config("llama", tie=True))
    path = save(ref_model, tmp_path / "ckpt")
    word_tokenizer(VOCAB - 10).save_pretrained(path)
    model, tokenizer = load_pretrained(path)
    assert len(tokenizer) == VOCAB - 10 and tokenizer.eos_token_id == 2
    out = export_merged(model, tmp_path / "out", tokenizer)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == VOCAB - 10


def test_exported_config_reads_back_for_every_preset():
    for name, config in PRESETS.items():
        assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config, name


@pytest.mark.slow
def test_gguf_file_loads_and_answers():
    """The SmolLM2-135M-Instruct GGUF through load_pretrained: greedy decoding answers 2 + 3."""
    model, tokenizer = load_pretrained(smollm2_gguf_path())
    assert (model.config.num_layers, model.config.dim, model.config.vocab_size) == (30, 576, 49152)
    messages = [{"role": "user", "content": "What is 2+3? Answer with just the number."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    prompt = jnp.asarray([ids], jnp.int32)
    weights, config = model.weights(), model.config
    logits, cache = prefill(weights, config, prompt, jnp.ones_like(prompt), prompt.shape[1])
    cache = cache.for_decoding(copies=1, slots=8)
    answer = []
    for _ in range(8):
        token = jnp.argmax(logits, axis=-1)
        answer.append(int(token[0]))
        logits, cache = decode(weights, config, token, cache)
    assert "5" in tokenizer.decode(answer)


# ------------------------------------------------------------------------------- bad inputs


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _drop_tensor(path, name):
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _then_load(action):
    """A case that changes the checkpoint directory, then loads the directory."""
    return lambda path: (action(path), path)[1]


def _plain_file(path):
    (path / "weights.bin").write_bytes(b"")
    return path / "weights.bin"


BAD_INPUTS = {
    "missing path": (
        lambda p: p / "nowhere",
        FileNotFoundError,
        r"nowhere does not exist",
    ),
    "not a directory or gguf": (_plain_file, ValueError, r"expected a directory or a \.gguf"),
    "no config.json": (
        _then_load(lambda p: (p / "config.json").unlink()),
        FileNotFoundError,
        r"no config\.json",
    ),
    "index lists a missing shard": (
        _then_load(
            lambda p: (p / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"model.norm.weight": "model-2-of-2.safetensors"}})
            )
        ),
        FileNotFoundError,
        r"lists shard files that are missing: \['model-2-of-2\.safetensors'\]",
    ),
    "no safetensors": (
        _then_load(lambda p: (p / "model.safetensors").unlink()),
        FileNotFoundError,
        r"no model\.safetensors or model\.safetensors\.index\.json",
    ),
    "unsupported architecture": (
        _then_load(lambda p: _edit_config(p, model_type="gpt2", architectures=["GPT2LMHeadModel"])),
        ValueError,
        r"config\.json: model_type='gpt2'.*supported model_type: \['llama', 'qwen2', 'qwen3'\]",
    ),
    "unsupported rope type": (
        _then_load(
            lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "rope_theta": 1})
        ),
        ValueError,
        r"rope_parameters\.rope_type='yarn' is not supported",
    ),
    "incomplete llama3 rope": (
        _then_load(
            lambda p: _edit_config(p, rope_parameters={"rope_type": "llama3", "rope_theta": 1})
        ),
        ValueError,
        r"rope_parameters of rope_type 'llama3' lacks 'factor'",
    ),
    "missing config field": (
        _then_load(lambda p: _edit_config(p, hidden_size=None)),
        ValueError,
        r"missing required fields \['hidden_size'\]",
    ),
    "tensor shape mismatch": (
        _then_load(lambda p: _edit_config(p, intermediate_size=128)),
        ValueError,
        r"tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape \((96, 64|64, 96)\), "
        r"expected \((128, 64|64, 128)\)",
    ),
    "missing tensor": (
        _then_load(lambda p: _drop_tensor(p, "model.layers.1.mlp.up_proj.weight")),
        ValueError,
        r"missing tensors 'model\.layers\.1\.mlp\.up_proj\.weight'$",
    ),
    "unexpected tensor": (
        _then_load(lambda p: _edit_config(p, num_hidden_layers=1)),
        ValueError,
        r"unexpected tensor 'model\.layers\.1\.",
    ),
    "tokenizer larger than the embedding": (
        _then_load(lambda p: word_tokenizer(VOCAB + 4).save_pretrained(p)),
        ValueError,
        rf"tokenizer has {VOCAB + 4} tokens but the model's embedding has vocab_size={VOCAB}",
    ),
}


@pytest.fixture(scope="module")
def tiny_checkpoint_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save(hf_model(hf_config("llama", tie=True)), path)
    return {f.name: f.read_bytes() for f in path.iterdir()}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(tmp_path, tiny_checkpoint_files, case):
    for name, data in tiny_checkpoint_files.items():
        (tmp_path / name).write_bytes(data)
    make_path, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message) as info:
        load_pretrained(make_path(tmp_path))
    assert str(tmp_path) in str(info.value)  # names the file


def test_export_errors(tmp_path, tiny_checkpoint_files):
    for name, data in tiny_checkpoint_files.items():
        (tmp_path / name).write_bytes(data)
    model, _ = load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape("no LoRA adapters (lora_rank=0)")):
        export_peft_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"dtype='float16'"):
        export_merged(model, tmp_path / "out", dtype="float16")
