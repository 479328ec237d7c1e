"""Update-step cost of GRPO, SFPO and GXPO on one fixed rollout batch (a script, not a test).

    .venv/bin/python benchmarks/update_step.py                    # tiny model, then SmolLM2-135M
    .venv/bin/python benchmarks/update_step.py --models=smollm2 --repeats=7

Times the trainer's own jitted update (`gxpo.train.builders.update_step`, donated state) of
each variant below, built from the base config as the trainer builds it, on the same batch,
interleaved (A B C ... A B C ...) after warm-up so that machine noise hits all alike, and
prints per variant the median / min / max seconds, the
compiled program's memory (`Compiled.memory_analysis()`: temporaries, and arguments + outputs
- donated aliases) and the process's peak RSS while the variant ran. The last line holds the
ratios the issue asks for, for the last model:

    gxpo_over_grpo=<r> gxpo_over_sfpo3=<r> gxpo_off_over_grpo=<r>

(GXPO at K=5; physical limits 3.0, 0.75 and 1.0: a gradient evaluation is the unit of cost.)
"packed" variants run the same update on the batch with its responses packed into rows
(`train.pack_responses`, `gxpo.models.packing`); the batch's response lengths are uniform in
1..A (one of them A), so packing's gain here is that of a mean length of A / 2
(`grpo_packed_over_grpo`, `gxpo_packed_over_gxpo`).
"gxpo K=5 off" is GXPO after its gate has shut extrapolation off for good, run as the Trainer
runs it then: the plain inner step's own program (`gxpo.train.builders.plain_step`) on GXPO's
state; "gxpo K=5 off cond" is the same step through GXPO's own program, whose `lax.cond` still
carries the probe branch (what the Trainer ran before; `gxpo_off_cond_over_grpo`).

Shapes: the key in `gxpo.models.config`; here Q prompts, G responses per prompt, B = Q * G, P
prompt tokens, A response tokens, T = P + A; the loss sees a window of A + 1 tokens (the last
prompt token and the responses, `gxpo.train.loss.Batch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gxpo import allocator
from gxpo.models import get_preset, init_model, load_pretrained, split_trainable
from gxpo.models.gguf import smollm2_gguf_path
from gxpo.rl import grpo
from gxpo.train import builders, updates
from gxpo.train import loss as loss_lib
from gxpo.train.defaults import base_config
from gxpo.train.state import init_state

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Variant:
    """One policy update to time; `grad_evals` is what its metrics must report."""

    label: str
    policy: str  # a registered policy update (gxpo.train.updates)
    depth: int = 0  # its depth field (SFPO fast_steps, GXPO virtual_depth); 0 = the default
    gate_on: bool = True
    cond_when_off: bool = False  # gate off: the policy update's own program, not the plain step's
    grad_evals: int = 1
    group: tuple[tuple[str, Any], ...] = ()  # further fields of config.policy_update.<policy>
    packed: bool = False  # the responses packed into rows (train.pack_responses)


VARIANTS = (
    Variant("grpo", "grpo"),
    Variant("grpo packed", "grpo", packed=True),
    Variant("sfpo K=3", "sfpo", 3, grad_evals=4),
    Variant("gxpo K=3", "gxpo", 3, grad_evals=3),
    Variant("gxpo K=5", "gxpo", 5, grad_evals=3),
    Variant("gxpo K=5 packed", "gxpo", 5, grad_evals=3, packed=True),
    Variant("gxpo K=10", "gxpo", 10, grad_evals=3),
    Variant("gxpo K=5 clip", "gxpo", 5, grad_evals=3, group=(("retention", "clipped_gradient"),)),
    Variant("gxpo K=5 upd", "gxpo", 5, grad_evals=3, group=(("retention", "update"),)),
    Variant("gxpo K=5 off", "gxpo", 5, gate_on=False),
    Variant("gxpo K=5 off cond", "gxpo", 5, gate_on=False, cond_when_off=True),
)


@dataclasses.dataclass
class Result:
    variant: Variant
    seconds: list[float]  # wall clock per timed call
    cpu_seconds: list[float]  # process CPU time (all threads) per timed call
    sys_seconds: list[float]  # of which in the kernel (page faults of fresh temporaries)
    faults: list[int]  # minor page faults per timed call
    compile_seconds: float
    temp_bytes: int
    io_bytes: int  # arguments + outputs - donated (aliased) buffers
    peak_rss_bytes: int


class PeakRSS:
    """A background thread that tracks the process's peak resident memory since `reset()`.

    /proc/self/statm is Linux only; elsewhere the peak stays 0 (reported as "-").
    """

    def __init__(self, interval_s: float = 0.002):
        self._interval_s = interval_s
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._peak = 0
        self._stop = threading.Event()
        self._ok = os.path.exists("/proc/self/statm")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while self._ok and not self._stop.wait(self._interval_s):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self._peak = self._rss() if self._ok else 0

    @property
    def peak(self) -> int:
        return self._peak


def load_model(name: str) -> tuple[Any, dict, dict]:
    """(model_config, trainable, frozen) as pure weight dicts, as the Trainer holds them."""
    if name == "smollm2":
        model, _ = load_pretrained(smollm2_gguf_path(), lora_rank=16, lora_alpha=32.0)
    elif name == "tiny":
        model = init_model(get_preset("tiny", lora_rank=4, lora_alpha=8.0))
    else:
        raise ValueError(f"--models: unknown model {name!r}; allowed: tiny, smollm2")
    _, trainable, frozen = split_trainable(model)
    return model.config, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def fixed_batch(
    model_config: Any,
    trainable: dict,
    frozen: dict,
    *,
    prompts: int,
    group: int,
    prompt_tokens: int,
    response_tokens: int,
    seed: int,
) -> loss_lib.Batch:
    """A rollout-shaped batch: left-padded prompts, right-padded responses (the longest one
    fills A), mixed rewards in every group, and old / reference log-probs over the response
    window (the last prompt token and the A response slots) computed the way the trainer
    computes them (the reference with adapters off)."""
    rng = np.random.default_rng(seed)
    B, P, A = prompts * group, prompt_tokens, response_tokens
    tokens_BxT = rng.integers(0, model_config.vocab_size, (B, P + A), dtype=np.int32)
    tokens_BxT[:, :P] = np.repeat(tokens_BxT[::group, :P], group, axis=0)  # G rows per prompt
    prompt_len_B = np.repeat(rng.integers(P // 2, P + 1, prompts), group)
    response_len_B = rng.integers(1, A + 1, B)
    response_len_B[0] = A
    pos_T = np.arange(P + A)
    prompt_BxT = (pos_T >= P - prompt_len_B[:, None]) & (pos_T < P)
    response_BxT = (pos_T >= P) & (pos_T < P + response_len_B[:, None])
    rewards_B = (np.arange(B) % 2).astype(np.float32)  # every group holds 0s and 1s
    mask_BxT = jnp.asarray(prompt_BxT | response_BxT)
    tokens_BxT = jnp.asarray(tokens_BxT)
    old_logp, ref_logp = loss_lib.batch_logprobs(
        trainable,
        frozen,
        None,
        tokens_BxT,
        mask_BxT,
        model_config=model_config,
        temperature=1.0,
        window=A + 1,
        with_old=True,
        reference="adapters_off",
        group_size=group,
    )
    return loss_lib.Batch(
        tokens=tokens_BxT,
        mask=mask_BxT,
        response_mask=jnp.asarray(response_BxT[:, P - 1 :]),
        advantages=grpo.group_advantages(jnp.asarray(rewards_B), group),
        old_logp=old_logp,
        ref_logp=ref_logp,
    )


def variant_config(variant: Variant, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The base config (the paper's loss, AdamW behind a 1.0 clip, the gate) at the benchmark's
    batch shape and learning rate, with the variant's policy update."""
    c = base_config()
    c.rollout.prompts_per_step, c.rollout.responses_per_prompt = args.prompts, args.group
    c.rollout.max_new_tokens, c.rollout.temperature = args.response_tokens, 1.0
    c.optimizer.lr, c.optimizer.grad_clip = args.lr, 1.0
    c.loss.kl_coef = 1e-3
    c.policy_update.name = variant.policy
    if variant.depth:
        depth_field = updates.get(variant.policy).depth_field
        c.policy_update[variant.policy][depth_field] = variant.depth
    for field, value in variant.group:
        c.policy_update[variant.policy][field] = value
    # The real gate, but one that cannot fire during a benchmark: the active variants stay active.
    c.policy_update.gate.warmup = 10**9
    return c


def build_step(
    variant: Variant, args: argparse.Namespace, model_config: Any, trainable: dict
) -> tuple[Any, Any]:
    """(jitted update, its initial train state on its own copy of the trainable weights); with
    the gate off for good, the program the Trainer then runs (unless `cond_when_off`)."""
    c = variant_config(variant, args)
    tx = builders.policy_update(c)
    own = jax.tree.map(jnp.copy, trainable)  # each variant's steps donate their own copy
    opt_state = tx.init(own)
    if not variant.gate_on:
        opt_state = opt_state._replace(gate=opt_state.gate._replace(on=jnp.array(False)))
        plain = builders.plain_step(c, tx)
        if not plain.is_off(opt_state):
            raise RuntimeError(f"{variant.label}: the gate is off, but not for good")
        if not variant.cond_when_off:
            tx = plain.tx
    state = init_state(own, opt_state, {"position": 0})
    return builders.update_step(c, model_config, tx), state


def bench_model(name: str, args: argparse.Namespace) -> list[Result]:
    model_config, trainable, frozen = load_model(name)
    batch = fixed_batch(
        model_config,
        trainable,
        frozen,
        prompts=args.prompts,
        group=args.group,
        prompt_tokens=args.prompt_tokens,
        response_tokens=args.response_tokens,
        seed=args.seed,
    )
    batches = {False: batch, True: loss_lib.with_packing(batch)}
    variants = [v for v in VARIANTS if not args.variants or v.label in args.variants]
    compiled, states, results = [], [], []
    for v in variants:
        update, state = build_step(v, args, model_config, trainable)
        t0 = time.perf_counter()
        exe = update.lower(state, frozen, batches[v.packed]).compile()
        compile_s = time.perf_counter() - t0
        mem = exe.memory_analysis()
        temp = int(mem.temp_size_in_bytes) if mem else 0
        io = (
            int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
            if mem
            else 0
        )
        compiled.append(exe)
        states.append(state)
        results.append(Result(v, [], [], [], [], compile_s, temp, io, 0))
        print(f"  compiled {v.label:<17} in {compile_s:6.1f} s", flush=True)

    with PeakRSS() as rss:
        for rep in range(args.warmup + args.repeats):
            for i, (v, exe) in enumerate(zip(variants, compiled)):
                rss.reset()
                t0, c0 = time.perf_counter(), time.process_time()
                u0 = resource.getrusage(resource.RUSAGE_SELF)
                states[i], metrics = exe(states[i], frozen, batches[v.packed])
                jax.block_until_ready((states[i], metrics))
                seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
                u1 = resource.getrusage(resource.RUSAGE_SELF)
                evals = int(metrics["grad_evals"])
                if evals != v.grad_evals:
                    raise RuntimeError(
                        f"{v.label}: {evals} gradient evaluations, expected {v.grad_evals}"
                    )
                if rep >= args.warmup:
                    results[i].seconds.append(seconds)
                    results[i].cpu_seconds.append(cpu_seconds)
                    results[i].sys_seconds.append(u1.ru_stime - u0.ru_stime)
                    results[i].faults.append(u1.ru_minflt - u0.ru_minflt)
                    results[i].peak_rss_bytes = max(results[i].peak_rss_bytes, rss.peak)
            if rep >= args.warmup:
                done = rep - args.warmup + 1
                print(f"  repeat {done}/{args.repeats} done", flush=True)
    return results


def median(r: Result, cpu: bool = False) -> float:
    return statistics.median(r.cpu_seconds if cpu else r.seconds)


def format_table(results: list[Result]) -> str:
    base = next((median(r) for r in results if r.variant.label == "grpo"), None)
    head = (
        f"{'variant':<17} {'evals':>5} {'median s':>9} {'min s':>8} {'max s':>8} "
        f"{'x grpo':>7} {'per eval':>8} {'cpu s':>8} {'sys s':>6} {'faults':>7} {'temp MiB':>9} "
        f"{'args+out':>9} {'RSS MiB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        m = median(r)
        rel = f"{m / base:7.2f}" if base else f"{'-':>7}"
        per_eval = f"{m / base / r.variant.grad_evals:8.2f}" if base else f"{'-':>8}"
        rss = f"{r.peak_rss_bytes / MIB:8.0f}" if r.peak_rss_bytes else f"{'-':>8}"
        lines.append(
            f"{r.variant.label:<17} {r.variant.grad_evals:>5} {m:9.3f} {min(r.seconds):8.3f} "
            f"{max(r.seconds):8.3f} {rel} {per_eval} {median(r, cpu=True):8.2f} "
            f"{statistics.median(r.sys_seconds):6.2f} {statistics.median(r.faults):7.0f} "
            f"{r.temp_bytes / MIB:9.1f} {r.io_bytes / MIB:9.1f} {rss}"
        )
    return "\n".join(lines)


def ratios_line(results: list[Result], cpu: bool = False) -> str:
    """The issue's three ratios of medians (wall clock, or process CPU time)."""
    by_label = {r.variant.label: median(r, cpu) for r in results}

    def ratio(a: str, b: str) -> str:
        return f"{by_label[a] / by_label[b]:.3f}" if a in by_label and b in by_label else "n/a"

    return (
        f"gxpo_over_grpo={ratio('gxpo K=5', 'grpo')} "
        f"gxpo_clipped_over_grpo={ratio('gxpo K=5 clip', 'grpo')} "
        f"gxpo_update_over_grpo={ratio('gxpo K=5 upd', 'grpo')} "
        f"gxpo_over_sfpo3={ratio('gxpo K=5', 'sfpo K=3')} "
        f"gxpo_off_over_grpo={ratio('gxpo K=5 off', 'grpo')} "
        f"gxpo_off_cond_over_grpo={ratio('gxpo K=5 off cond', 'grpo')} "
        f"grpo_packed_over_grpo={ratio('grpo packed', 'grpo')} "
        f"gxpo_packed_over_gxpo={ratio('gxpo K=5 packed', 'gxpo K=5')}"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    p.add_argument("--variants", default="", help="comma list of labels (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all variants")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after compiling")
    p.add_argument("--prompts", type=int, default=4, help="Q")
    p.add_argument("--group", type=int, default=4, help="G")
    p.add_argument("--prompt-tokens", type=int, default=48, help="P (the arithmetic prompts')")
    p.add_argument("--response-tokens", type=int, default=64, help="A")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--keep-freed-memory",
        choices=("on", "off"),
        default="on",
        help="gxpo.allocator.keep_freed_memory, as the launchers set it (off: glibc's default)",
    )
    args = p.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - {v.label for v in VARIANTS})
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; allowed: {[v.label for v in VARIANTS]}")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    kept = args.keep_freed_memory == "on" and allocator.keep_freed_memory()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
    print(f"keep_freed_memory={'on' if kept else 'off'}")
    line = ""
    for name in args.models:
        print(
            f"\n{name}: B={args.prompts * args.group} ({args.prompts}x{args.group}), "
            f"T={args.prompt_tokens + args.response_tokens} "
            f"(P={args.prompt_tokens}, A={args.response_tokens}); {args.repeats} interleaved "
            f"repeats after {args.warmup} warm-up",
            flush=True,
        )
        results = bench_model(name, args)
        line = ratios_line(results)
        print(format_table(results))
        print(f"{name} (cpu time): {ratios_line(results, cpu=True)}")
        print(f"{name}: {line}", flush=True)
    print(line)


if __name__ == "__main__":
    main()
