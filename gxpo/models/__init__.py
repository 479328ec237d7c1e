"""Flax NNX decoder-only language models (Llama 3.x, SmolLM2, Qwen2.x, Qwen3) with LoRA.

- `config`: `ModelConfig` and the package's one shape-letter key.
- `sharding`: the logical-axis table of parameters and activations, and its resolver.
- `attention`: the attention kernels (plain, shared-prefix, cached).
- `transformer`: the `Transformer` parameters, its layer pieces and `forward`.
- `decode`: the prompt cache (`prefill`), the decoding loop's cache and step (`decode`).
- `lora`: the trainable/frozen split and folding adapters; `presets`: named configs;
  `checkpoints` / `gguf`: Hugging Face and GGUF loading, HF / PEFT export;
  `char_tokenizer`: the character tokenizer of tiny runs.
"""

from gxpo.models.checkpoints import export_merged, export_peft_adapter, load_pretrained
from gxpo.models.config import PROJECTIONS, ModelConfig, RopeScaling
from gxpo.models.decode import DecodeCache, KVCache, decode, prefill, unstack_layers
from gxpo.models.lora import fold_lora, lora_weights, merge_trainable, split_trainable
from gxpo.models.presets import PRESETS, config_from_hf, config_to_hf, get_preset
from gxpo.models.sharding import LOGICAL_AXES
from gxpo.models.transformer import Transformer, forward, init_model

__all__ = [
    "LOGICAL_AXES",
    "PRESETS",
    "PROJECTIONS",
    "DecodeCache",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "config_from_hf",
    "config_to_hf",
    "decode",
    "export_merged",
    "export_peft_adapter",
    "fold_lora",
    "forward",
    "get_preset",
    "init_model",
    "load_pretrained",
    "lora_weights",
    "merge_trainable",
    "prefill",
    "split_trainable",
    "unstack_layers",
]
