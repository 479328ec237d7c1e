"""Qwen2.5-7B-Instruct with GRPO / SFPO / GXPO on MATH level 3-5, the paper's protocol.

    python launch.py --config=configs/qwen2p5_7b.py
    python launch.py --config=configs/qwen2p5_7b.py --config.policy_update.name=grpo
    python launch.py --config=configs/qwen2p5_7b.py --config.model.path=/local/Qwen2.5-7B-Instruct

model.path: the hub id (downloaded on first use when the machine is online) or a local
Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files), e.g. from
`huggingface-cli download Qwen/Qwen2.5-7B-Instruct`.
Hardware: `--config=configs/qwen2p5_7b.py:h100x4` (the default: 4 x H100 80GB, the
paper's setup, FSDP) or `:h100x1` (one 80 GB GPU); run with XLA_PYTHON_CLIENT_MEM_FRACTION=.92.
Both keep the paper's batch, 128 prompts x 5 responses and one optimizer update per step:
remat, gradient accumulation over micro-batches of 5 rows per GPU (activations and logits
of 4096-token rows), and where the KV cache needs it, prompts sampled in sequential chunks.
The per-GPU memory estimate is printed before compiling.
Evaluation: Math-500, AMC23, GSM8K, Minerva Math, OlympiadBench, avg pass@1 over 4 samples at
temperature 1.0.
Expected: the paper reports GXPO reaching GRPO's peak accuracy in fewer steps; this config has
not been run to completion here (no such GPUs at hand), see README.md, "Results".
"""

from gxpo.train.defaults import base_config, set_hardware

HARDWARE = {  # sized by gxpo.train.mesh's estimate: 5 rows per GPU per micro-batch
    "h100x4": dict(data=1, fsdp=4, micro_batches=32),  # FSDP: 3.5 GiB of weights per GPU
    "h100x1": dict(data=1, micro_batches=128, sample_chunks=4),
}


def get_config(hardware: str = "h100x4"):
    c = base_config()  # the paper's protocol: see gxpo/train/defaults.py
    c.model.path = "Qwen/Qwen2.5-7B-Instruct"  # or a local checkpoint directory
    return set_hardware(c, HARDWARE, hardware)
