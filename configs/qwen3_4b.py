"""Qwen3-4B with GRPO / SFPO / GXPO on MATH level 3-5: the paper's protocol (128 prompts x 5
responses, LoRA 128/256, 300 steps, GXPO K = 5; every field in `gxpo/train/defaults.py`), on the
model the paper's authors also ran GXPO on.

Command (the presets assume JAX may take 92% of each GPU's memory):

    XLA_PYTHON_CLIENT_MEM_FRACTION=.92 python launch.py --config=configs/qwen3_4b.py
    XLA_PYTHON_CLIENT_MEM_FRACTION=.92 python launch.py --config=configs/qwen3_4b.py:h100x1

Hardware: `:h100x4` (the default, the paper's setup) is 4 x H100 80GB on one host, data parallel;
`:h100x1` is one 80 GB GPU with the same protocol (more micro-batches and sampling chunks). Both
presets were sized by `gxpo.train.memory`'s estimate to 68 GiB per GPU
(`gxpo.train.defaults.set_hardware`), not on the hardware itself: the fewest micro-batches and
sampling chunks under that budget. Qwen3-4B keeps 8 key/value heads of 128 (Qwen2.5-3B: 2), so
its KV cache is 4x larger per token and the sampler needs more chunks than the update needs
micro-batches: estimated peaks 59.9 GiB (update) / 53.5 GiB (sampler, 2 chunks) per GPU on
h100x4, 59.9 / 53.5 GiB (8 chunks) on h100x1.

Expected result and run time: not measured. Nothing has run this config to completion (no such GPUs
at hand), so there is no accuracy or wall-clock figure for it; a run writes avg pass@1 on Math-500,
AMC23, GSM8K, Minerva Math and OlympiadBench to eval.jsonl in its work directory. Nothing of it has
been timed on a GPU either.

model.path: the hub id `Qwen/Qwen3-4B` (downloaded on first use) or a local Hugging Face
checkpoint directory, `--config.model.path=/local/Qwen3-4B`. Its chat template opens the
assistant's turn in thinking mode (`<think>` first), and responses are cut at
`rollout.max_new_tokens`.
"""

from gxpo.train.defaults import base_config, set_hardware

HARDWARE = {  # sized by gxpo.train.memory's estimate: 5 rows per GPU per micro-batch
    "h100x4": dict(data=4, micro_batches=32, sample_chunks=2),
    "h100x1": dict(data=1, micro_batches=128, sample_chunks=8),
}


def get_config(hardware: str = "h100x4"):
    c = base_config()  # the paper's protocol: see gxpo/train/defaults.py
    c.model.path = "Qwen/Qwen3-4B"  # or a local checkpoint directory
    return set_hardware(c, HARDWARE, hardware)
