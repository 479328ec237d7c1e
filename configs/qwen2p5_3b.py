"""Qwen2.5-3B-Instruct with GRPO / SFPO / GXPO on MATH level 3-5: the paper's protocol (128 prompts
x 5 responses, LoRA 128/256, 300 steps, GXPO K = 5; every field in `gxpo/train/defaults.py`).

Command (the presets assume JAX may take 92% of each GPU's memory):

    XLA_PYTHON_CLIENT_MEM_FRACTION=.92 python launch.py --config=configs/qwen2p5_3b.py
    XLA_PYTHON_CLIENT_MEM_FRACTION=.92 python launch.py --config=configs/qwen2p5_3b.py:h100x1

Hardware: `:h100x4` (the default, the paper's setup) is 4 x H100 80GB on one host, data parallel;
`:h100x1` is one 80 GB GPU with the same protocol (more micro-batches and sampling chunks). Both
presets were sized by `gxpo.train.memory`'s estimate to 68 GiB per GPU
(`gxpo.train.defaults.set_hardware`), not on the hardware itself.

The GXPO authors' variant: `--config=configs/qwen2p5_3b.py:h100x4,authors` (or `:h100x1,authors`)
sets what their own code does where it differs from the paper's text, and their recipe
(`gxpo.train.defaults.authors_recipe` lists every field: 64 prompts x 8 responses in 4 GXPO
updates, the optimizer state restored for the corrective step, retention on AdamW's update
directions, the entropy gate with patience 3 after a 50-step warm-up, no KL, entropy bonus 1e-3,
weight decay 0.01, evaluation at top-p 0.7, 400 steps); they ship no launcher for this model, so the
recipe's common values apply.

Expected result and run time: not measured. Nothing has run this config to completion (no such GPUs
at hand), so there is no accuracy or wall-clock figure for it; a run writes avg pass@1 on Math-500,
AMC23, GSM8K, Minerva Math and OlympiadBench to eval.jsonl in its work directory. Nothing of it has
been timed on a GPU either.

model.path: the hub id `Qwen/Qwen2.5-3B-Instruct` (downloaded on first use) or a local Hugging Face
checkpoint directory, `--config.model.path=/local/Qwen2.5-3B-Instruct`.
"""

from gxpo.train.defaults import base_config, set_hardware

HARDWARE = {  # the fewest micro-batches and chunks within 68 GiB by the estimate, less 10%
    "h100x4": dict(data=4, micro_batches=16),
    "h100x1": dict(data=1, micro_batches=64, sample_chunks=2),
}

# The authors' per-model values (`:<hardware>,authors`), on top of their common recipe.
AUTHORS = {}


def get_config(arg: str = "h100x4"):
    c = base_config()  # the paper's protocol: see gxpo/train/defaults.py
    c.model.path = "Qwen/Qwen2.5-3B-Instruct"  # or a local checkpoint directory
    return set_hardware(c, HARDWARE, arg, authors=AUTHORS)
