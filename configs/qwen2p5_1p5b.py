"""Qwen2.5-1.5B-Instruct with GRPO / SFPO / GXPO on MATH level 3-5: the paper's protocol.

    python launch.py --config=configs/qwen2p5_1p5b.py                # 4 x H100 (the paper's setup)
    python launch.py --config=configs/qwen2p5_1p5b.py:h100x1         # one 80 GB GPU
    python launch.py --config=configs/qwen2p5_1p5b.py --config.model.path=/local/Qwen2.5-1.5B-Instruct

Hardware presets, model.path (hub id `Qwen/Qwen2.5-1.5B-Instruct` or a local directory) and memory:
`gxpo.train.defaults.set_hardware`. Not run to completion here (no such GPUs at hand).
"""

from gxpo.train.defaults import base_config, set_hardware

HARDWARE = {  # sized by gxpo.train.mesh's estimate: 5 rows per GPU per micro-batch
    "h100x4": dict(data=4, micro_batches=32),
    "h100x1": dict(data=1, micro_batches=128, sample_chunks=2),
}


def get_config(hardware: str = "h100x4"):
    c = base_config()  # the paper's protocol: see gxpo/train/defaults.py
    c.model.path = "Qwen/Qwen2.5-1.5B-Instruct"  # or a local checkpoint directory
    return set_hardware(c, HARDWARE, hardware)
