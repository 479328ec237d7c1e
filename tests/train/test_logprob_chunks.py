"""The trainer's old / reference log-prob pass in chunks of whole groups (the memory of one
chunk) gives the log-probs of the whole batch at once."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gxpo.models import get_preset, init_model, split_trainable
from gxpo.train.trainer import batch_logprobs_in_chunks


def test_chunked_logprobs_equal_the_whole_batch():
    config = get_preset("tiny", dtype="float32", lora_rank=4, lora_alpha=8.0)
    _, trainable, frozen = split_trainable(init_model(config, seed=0))
    trainable, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    rng = np.random.default_rng(0)
    # LoRA B starts at zero: move it, so that the policy and the reference (adapters off) differ
    trainable = jax.tree.map(
        lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), trainable
    )
    Q, G, P, A = 4, 2, 8, 6
    tokens = rng.integers(3, config.vocab_size, (Q * G, P + A))
    tokens[:, :P] = np.repeat(tokens[::G, :P], G, axis=0)  # each group shares its prompt
    mask = np.ones(tokens.shape, bool)
    mask[:, : P // 2] = rng.random((Q * G, 1)) < 0.5  # some left padding
    mask[:, -2:] = np.arange(Q * G)[:, None] % 3 != 0  # some rows end early
    args = (trainable, frozen, None, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    kwargs = dict(model_config=config, temperature=1.0, window=A + 1, with_old=True,
                  reference="adapters_off", group_size=G)  # fmt: skip
    whole = batch_logprobs_in_chunks(*args, chunks=1, **kwargs)
    chunked = batch_logprobs_in_chunks(*args, chunks=2, **kwargs)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape == (Q * G, A + 1)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    assert not np.allclose(whole[0], whole[1])  # old and reference differ: both were checked
