"""Qwen2.5-1.5B-Instruct with GRPO / SFPO / GXPO on MATH level 3-5, the paper's protocol.

    python launch.py --config=configs/qwen2p5_1p5b.py
    python launch.py --config=configs/qwen2p5_1p5b.py --config.policy_update.name=grpo
    python launch.py --config=configs/qwen2p5_1p5b.py --config.model.path=/local/Qwen2.5-1.5B-Instruct

model.path: the hub id (downloaded on first use when the machine is online) or a local
Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files), e.g. from
`huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct`.
Hardware: sized for 4 x H100 80GB (the paper's setup); one 80GB GPU runs it with
--config.mesh.data=1 and more mini-batches. Evaluation: Math-500, AMC23, GSM8K, Minerva Math,
OlympiadBench, avg pass@1 over 4 samples at temperature 1.0.
Expected: the paper reports GXPO reaching GRPO's peak accuracy in fewer steps; this config has
not been run to completion here (no such GPUs at hand), see README.md, "Results".
"""

from gxpo.train.defaults import base_config


def get_config():
    c = base_config()  # the paper's protocol: see gxpo/train/defaults.py
    c.model.path = "Qwen/Qwen2.5-1.5B-Instruct"  # or a local checkpoint directory
    return c
