"""Flax NNX decoder-only language models (Llama 3.x, SmolLM2, Qwen2.x) with LoRA."""
