"""Qwen2.5-Math-7B-Instruct with GRPO / SFPO / GXPO on MATH level 3-5: the paper's protocol (128
prompts x 5 responses, LoRA 128/256, 300 steps, GXPO K = 5; every field in
`gxpo/train/defaults.py`), and the model the GXPO authors' 7B runs train.

Command (the presets assume JAX may take 92% of each GPU's memory):

    XLA_PYTHON_CLIENT_MEM_FRACTION=.92 python launch.py --config=configs/qwen2p5_math_7b.py
    XLA_PYTHON_CLIENT_MEM_FRACTION=.92 python launch.py --config=configs/qwen2p5_math_7b.py:h100x1
    XLA_PYTHON_CLIENT_MEM_FRACTION=.92 python launch.py \
        --config=configs/qwen2p5_math_7b.py:h100x4,authors

Hardware: `:h100x4` (the default) is 4 x H100 80GB on one host, the weights split over the four
(FSDP); `:h100x1` is one 80 GB GPU with the same protocol (more micro-batches and sampling
chunks). The presets were sized by `gxpo.train.memory`'s estimate to 68 GiB per GPU
(`gxpo.train.defaults.set_hardware`), not on the hardware itself. The shapes are Qwen2.5-7B's.

The GXPO authors' variant (`:<hardware>,authors`): their recipe
(`gxpo.train.defaults.authors_recipe`) with the values of their Qwen2.5-Math-7B launcher
(`qwen25_math_7b_gxpo_b256_a03_k10.sh` in GitHub SwapniL-afk-now/final-gxpo): 256 prompts x 8
responses in 4 GXPO updates of 64 prompts, K = 5, alpha = 0.3, responses of at most 2048 tokens,
no entropy bonus, a k3 KL term of 0.01, and the entropy gate at threshold 1.5 with patience 2 and
at most 150 active steps.

Expected result and run time: not measured. Nothing has run this config (no such GPUs at hand);
a run writes avg pass@1 on Math-500, AMC23, GSM8K, Minerva Math and OlympiadBench to eval.jsonl
in its work directory.

model.path: the hub id `Qwen/Qwen2.5-Math-7B-Instruct` (downloaded on first use) or a local
Hugging Face checkpoint directory.
"""

from gxpo.train.defaults import base_config, set_hardware

HARDWARE = {  # the fewest micro-batches and chunks within 68 GiB by the estimate, less 10%
    "h100x4": dict(data=1, fsdp=4, micro_batches=16),  # FSDP: 3.5 GiB of weights per GPU
    "h100x1": dict(data=1, micro_batches=128, sample_chunks=4),
}

# The authors' per-model values (`:<hardware>,authors`), on top of their common recipe.
AUTHORS = {
    "rollout.prompts_per_step": 256,
    "rollout.max_new_tokens": 2048,
    "policy_update.gxpo.virtual_depth": 5,
    "policy_update.gxpo.reposition": 0.3,
    "policy_update.gate.threshold": 1.5,
    "policy_update.gate.patience": 2,
    "policy_update.gate.max_active_steps": 150,
    "loss.entropy_coef": 0.0,
    "loss.kl_coef": 0.01,
    "loss.kl_estimator": "k3",
}


def get_config(arg: str = "h100x4"):
    c = base_config()  # the paper's protocol: see gxpo/train/defaults.py
    c.model.path = "Qwen/Qwen2.5-Math-7B-Instruct"  # or a local checkpoint directory
    c.model.preset = "qwen2.5-7b"  # the same shapes (memory estimate, random-init tests)
    return set_hardware(c, HARDWARE, arg, authors=AUTHORS)
