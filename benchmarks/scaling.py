"""How cost grows with the work: sampler tokens/s and update seconds (GRPO, GXPO K = 5) at 64,
256 and 1024 new tokens and at 16 and 64 rows (a script, not a test; it takes a while).

Random weights of SmolLM2-135M's shapes (float32, LoRA rank 16 / alpha 32 on q/k/v/o, as the
CPU default), 4 responses per prompt, 64-token prompts. The work is defined: the sampler draws
exactly A tokens per row (end tokens ignored, the static loop: every row is as long), and the
update's batch holds responses of exactly A tokens. The update runs as the trainer runs it
(`gxpo.train.builders.update_step`, the paper's loss with KL, AdamW behind a 1.0 clip), with
remat and one micro-batch per prompt (4 rows), so that 64 rows x 1088 tokens fit in memory;
each shape's old and reference log-probs are computed once, per prompt, beforehand. Times are
medians of `--repeats` calls of programs compiled ahead (compilation excluded). Prints a table;
the last line holds the growth from the smallest to the largest shape:

    sampler_tok_s_drop=<x> grpo_growth=<x> gxpo_growth=<x> work_growth=<x>

    .venv/bin/python benchmarks/scaling.py [--repeats 1] [--new-tokens 64,256,1024] [--rows 16,64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gxpo.models import get_preset, init_model, split_trainable
from gxpo.rl import grpo
from gxpo.rl.sampler import SamplingConfig, sample
from gxpo.train import builders
from gxpo.train import loss as loss_lib
from gxpo.train.defaults import base_config
from gxpo.train.state import init_state

GROUP = 4  # responses per prompt
PROMPT_TOKENS = 64


def timed(call, repeats: int) -> float:
    """Median seconds of `repeats` calls of an already compiled `call`."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def batch_for(model_config, trainable, frozen, rows: int, new_tokens: int) -> loss_lib.Batch:
    """Random prompts (G rows each) and responses of exactly `new_tokens`, rewards 0/1 in every
    group, with the old and reference log-probs of the response window."""
    rng = np.random.default_rng(0)
    P, A = PROMPT_TOKENS, new_tokens
    tokens_BxT = rng.integers(0, model_config.vocab_size, (rows, P + A), dtype=np.int32)
    tokens_BxT[:, :P] = np.repeat(tokens_BxT[::GROUP, :P], GROUP, axis=0)
    tokens_BxT, mask_BxT = jnp.asarray(tokens_BxT), jnp.ones((rows, P + A), bool)
    logprobs = jax.jit(
        lambda w, f, t, m: loss_lib.batch_logprobs(
            w, f, None, t, m, model_config=model_config, temperature=1.0,
            window=A + 1, with_old=True, reference="adapters_off", group_size=GROUP,
        )
    )  # fmt: skip
    # One prompt's rows at a time: the logits of 64 rows x 1025 tokens would not fit.
    parts = [
        logprobs(trainable, frozen, tokens_BxT[i : i + GROUP], mask_BxT[i : i + GROUP])
        for i in range(0, rows, GROUP)
    ]
    old, ref = (jnp.concatenate(x) for x in zip(*parts))
    return loss_lib.Batch(
        tokens=tokens_BxT,
        mask=mask_BxT,
        response_mask=jnp.ones((rows, A + 1), bool).at[:, 0].set(False),
        advantages=grpo.group_advantages(jnp.asarray(np.arange(rows) % 2, jnp.float32), GROUP),
        old_logp=old,
        ref_logp=ref,
    )


def update_seconds(policy, model_config, trainable, frozen, batch, rows, repeats) -> float:
    c = base_config()
    c.rollout.prompts_per_step, c.rollout.responses_per_prompt = rows // GROUP, GROUP
    c.rollout.max_new_tokens = batch.tokens.shape[1] - PROMPT_TOKENS
    c.optimizer.lr, c.optimizer.grad_clip, c.loss.kl_coef = 2e-4, 1.0, 1e-3
    c.train.micro_batches = rows // GROUP  # one prompt's rows per micro-batch
    c.policy_update.name = policy
    c.policy_update.gate.warmup = 10**9  # GXPO stays active: its probes run in every step
    tx = builders.policy_update(c)
    own = jax.tree.map(jnp.copy, trainable)
    state = [init_state(own, tx.init(own), {"position": 0})]
    update = builders.update_step(c, model_config, tx)
    update = update.lower(state[0], frozen, batch).compile()  # compiled ahead: not timed

    def call():
        state[0], metrics = update(state[0], frozen, batch)
        return metrics

    return timed(call, repeats)


def sampler_tokens_per_second(weights, model_config, rows, new_tokens, repeats) -> float:
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(0, model_config.vocab_size, (rows // GROUP, PROMPT_TOKENS)))
    mask = jnp.ones(prompts.shape, bool)
    sampling = SamplingConfig(max_new_tokens=new_tokens, num_samples=GROUP, ignore_eos=True)
    key = jax.random.key(0)
    run = sample.lower(weights, model_config, prompts, mask, key, sampling).compile()  # not timed
    return rows * new_tokens / timed(lambda: run(weights, prompts, mask, key), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", default="64,256,1024")
    parser.add_argument("--rows", default="16,64")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--preset", default="smollm2-135m", help="tiny: a quick check")
    args = parser.parse_args()
    lengths = [int(x) for x in args.new_tokens.split(",")]
    row_counts = [int(x) for x in args.rows.split(",")]

    model_config = get_preset(args.preset, lora_rank=16, lora_alpha=32.0, remat=True)
    model = init_model(model_config, seed=0)
    _, trainable, frozen = split_trainable(model)
    trainable, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    weights = model.weights()
    print(
        f"{args.preset} shapes, random weights, LoRA 16, {GROUP} responses per prompt, "
        f"{PROMPT_TOKENS}-token prompts; jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"medians of {args.repeats}, compiled ahead",
        flush=True,
    )
    head = (
        f"{'rows':>4} {'new tokens':>10} {'sampler tok/s':>13} {'GRPO update s':>13} "
        f"{'GXPO update s':>13} {'GXPO/GRPO':>9} {'GRPO s per 1k tokens':>20}"
    )
    print(head, "-" * len(head), sep="\n", flush=True)  # each row follows as it is measured
    table = {}
    for rows in row_counts:
        for A in lengths:
            rate = sampler_tokens_per_second(weights, model_config, rows, A, args.repeats)
            batch = batch_for(model_config, trainable, frozen, rows, A)
            job = (model_config, trainable, frozen, batch, rows, args.repeats)
            grpo_s, gxpo_s = (update_seconds(name, *job) for name in ("grpo", "gxpo"))
            del batch, job
            table[rows, A] = rate, grpo_s, gxpo_s
            per_k = grpo_s / (rows * (PROMPT_TOKENS + A) / 1000)
            print(
                f"{rows:>4} {A:>10} {rate:>13.1f} {grpo_s:>13.2f} {gxpo_s:>13.2f} "
                f"{gxpo_s / grpo_s:>9.2f} {per_k:>20.3f}",
                flush=True,
            )
    small, large = (min(row_counts), min(lengths)), (max(row_counts), max(lengths))
    work = (large[0] * (PROMPT_TOKENS + large[1])) / (small[0] * (PROMPT_TOKENS + small[1]))
    print(
        f"sampler_tok_s_drop={table[small][0] / table[large][0]:.2f} "
        f"grpo_growth={table[large][1] / table[small][1]:.2f} "
        f"gxpo_growth={table[large][2] / table[small][2]:.2f} work_growth={work:.2f}"
    )


if __name__ == "__main__":
    main()
