"""A checkpoint loads straight into its shardings: on 4 faked CPU devices (fsdp 2 x tensor 2),
every weight the trainer's builder loads (`gxpo.train.builders.model`, LoRA included) has the
sharding the rules give it, each device holds only its shard's shape, and the values equal a
plain single-device load.

The check runs in a subprocess: XLA's device count is fixed per process, and the rest of the
suite keeps one device."""

import json
import os
import subprocess
import sys

from hf_tiny import VOCAB, hf_config, hf_model, save, word_tokenizer

_CHECK = r"""
import json, sys
import jax
import numpy as np
from gxpo.models import load_pretrained
from gxpo.train import builders
from gxpo.train import mesh as mesh_lib
from gxpo.train.defaults import base_config

path = sys.argv[1]
assert jax.device_count() == 4
c = base_config()
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2
c.model.path, c.model.dtype, c.model.lora_rank, c.model.lora_alpha = path, "float32", 4, 8.0
mesh = mesh_lib.make_mesh(c.mesh)
# Whole arrays put on one device (what loading did before: each stacked weight, then a
# reshard) are recorded; the sharded load must make none.
single_device, device_put = [], jax.device_put

def spy(x, *args, **kwargs):
    out = device_put(x, *args, **kwargs)
    single_device.extend(a.shape for a in jax.tree.leaves(out) if len(a.devices()) == 1)
    return out

jax.device_put = spy
config, trainable, frozen, _ = builders.model(c.model, seed=3, mesh=mesh)
jax.device_put = device_put
assert not single_device, single_device
plain, _ = load_pretrained(path, lora_rank=4, lora_alpha=8.0, seed=3)
expected = mesh_lib.weight_shardings(config, mesh)

def leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}

loaded = leaves(trainable) | leaves(frozen)
assert not set(leaves(trainable)) & set(leaves(frozen))
want, reference = leaves(expected), leaves(plain.weights())
assert set(loaded) == set(want) == set(reference), (sorted(loaded), sorted(want))
split = []
for name, x in loaded.items():
    sharding = want[name]
    assert x.sharding.is_equivalent_to(sharding, x.ndim), (name, x.sharding, sharding)
    shard_shape = sharding.shard_shape(x.shape)
    assert {s.data.shape for s in x.addressable_shards} == {shard_shape}, name
    if shard_shape != x.shape:
        split.append(name)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(reference[name]), err_msg=name)
print(json.dumps({"weights": len(loaded), "split": sorted(split)}))
"""


def test_checkpoint_weights_are_created_in_their_shardings(tmp_path):
    path = save(hf_model(hf_config("qwen3", tie=False, head_dim=24)), tmp_path)
    word_tokenizer(VOCAB).save_pretrained(path)
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, path], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Every base weight, q/k norms and LoRA A/B of q/k/v/o.
    assert result["weights"] == 3 + 2 + 2 + 7 + 2 * 4
    # Split on these devices (the rest is replicated by the rules: layer norms' head_dim,
    # LoRA B's rank x heads); the stacked kernels and the embedding and head among them.
    for name in ("['embed']", "['lm_head']", "['layers']['q_proj']['kernel']",
                 "['layers']['down_proj']['kernel']", "['layers']['attn_norm']",
                 "['layers']['q_proj']['lora_a']"):  # fmt: skip
        assert name in result["split"], result
