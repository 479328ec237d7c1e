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

The GXPO authors' variant (`:<hardware>,authors`): their recipe
(`gxpo.train.defaults.authors_recipe`) with their Qwen3-4B launcher's values: the
Qwen3-4B-Instruct-2507 checkpoint, 256 prompts x 8 responses in 4 GXPO updates of 64 prompts,
K = 10, alpha = 0.5, gate threshold 1.5, and their concise-solution system prompt.

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


# The authors' per-model values (`:<hardware>,authors`), on top of their common recipe: their
# launcher qwen3_4b_gxpo_k10.sh. Its system prompt asks for concise solutions (their responses
# may run to 8192 tokens; this keeps the recipe's 3072).
AUTHORS = {
    "model.path": "Qwen/Qwen3-4B-Instruct-2507",
    "rollout.prompts_per_step": 256,
    "policy_update.gxpo.virtual_depth": 10,
    "policy_update.gxpo.reposition": 0.5,
    "policy_update.gate.threshold": 1.5,
    "data.system_prompt": (
        "Provide a concise solution with only the essential reasoning steps. Avoid long "
        "explanations and finish with the final answer."
    ),
}


def get_config(arg: str = "h100x4"):
    c = base_config()  # the paper's protocol: see gxpo/train/defaults.py
    c.model.path = "Qwen/Qwen3-4B"  # or a local checkpoint directory
    return set_hardware(c, HARDWARE, arg, authors=AUTHORS)
