"""Speed and memory of the GRPO and GXPO update steps on one GPU, at the paper's model shapes
(a script, not a test).

    python benchmarks/gpu_step.py                 # qwen2.5-1.5b, llama3.2-3b
    python benchmarks/gpu_step.py --models=qwen2.5-1.5b --rows=8 --seq=2048
    python benchmarks/gpu_step.py --cpu-smoke      # the tiny shape on CPU: the script runs

No model files: random weights of each preset's shape, bf16 base and compute, LoRA rank 128 /
alpha 256 on q/k/v/o in float32 (the paper's setup), and one fixed random rollout batch of
--rows x --seq tokens (a --prompt-token prompt, the rest response; random old / reference
log-probs, which change no cost). After one warm-up call each, the median of --repeats calls of

  fwd+bwd    value_and_grad of the GRPO loss alone
  grpo       the trainer's jitted, donated update step (`gxpo.train.builders.update_step`)
  gxpo K=5   the same with GXPO (K = 5, alpha = 0.5, gate on: three gradient evaluations)

is printed as a table, with tokens per second, compile seconds, the device's peak memory
(`memory_stats()["peak_bytes_in_use"]`, cumulative per process: each model runs in its own
subprocess and the kinds go from the smallest to the largest), the compiled program's
temporaries (`memory_analysis()`), and `gxpo.train.memory.estimate_memory` for the same shape.
Remat is switched on only where the estimate says the step would not fit otherwise; rows are
halved while even remat would not fit.

The loss, optimizer (AdamW 1e-6 behind a 1.0 clip) and gate are the base config's, built by
`gxpo.train.builders` as the trainer builds them. Shapes: the key in `gxpo.models.config`; here
B rows, T tokens per row, P prompt tokens, A = T - P + 1 the response window.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ("qwen2.5-1.5b", "llama3.2-3b")
KINDS = ("fwd+bwd", "grpo", "gxpo K=5")
GIB = 2**30


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated presets")
    p.add_argument("--rows", type=int, default=16, help="B, rows of the rollout batch")
    p.add_argument("--seq", type=int, default=1024, help="T, tokens per row")
    p.add_argument("--prompt", type=int, default=256, help="P, prompt tokens per row")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per kind")
    p.add_argument("--remat", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU, 2 repeats")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # one model, JSON rows out
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.models, args.rows, args.seq, args.prompt, args.repeats = "tiny", 4, 32, 8, 2
    return args


# ----------------------------------------------------------------------------- one model


def _run_model(name: str, args: argparse.Namespace) -> list[dict]:
    # Imported here: only the per-model child processes may touch (and preallocate) the GPU.
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gxpo.models import get_preset, init_model, split_trainable
    from gxpo.train import builders, updates
    from gxpo.train import loss as loss_lib
    from gxpo.train import memory as memory_lib
    from gxpo.train import mesh as mesh_lib
    from gxpo.train.defaults import base_config
    from gxpo.train.state import init_state

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    lora = {} if name == "tiny" else dict(lora_rank=128, lora_alpha=256.0)
    dtype = "float32" if args.cpu_smoke else "bfloat16"
    config = get_preset(name, dtype=dtype, param_dtype=dtype, **lora)
    if name == "tiny":
        config = dataclasses.replace(config, lora_rank=4, lora_alpha=8.0)
    rows, T, P = args.rows, args.seq, args.prompt
    A = T - P + 1
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}

    def estimate(cfg, rows, policy):
        work = memory_lib.Workload(
            rows, T, A, sample_rows=0, sample_len=0, step_buffers=updates.get(policy).step_buffers
        )
        return memory_lib.estimate_memory(cfg, sizes, work)

    def fits(cfg, rows):
        return limit is None or estimate(cfg, rows, "gxpo").update_peak <= 0.9 * limit

    remat = args.remat == "on" or (args.remat == "auto" and not fits(config, rows))
    config = dataclasses.replace(config, remat=remat)
    while args.remat == "auto" and rows > 1 and not fits(config, rows):
        rows //= 2

    mesh = mesh_lib.make_mesh(sizes, [device])  # the trainer's sharded init, on one device

    def init():
        _, trainable, frozen = split_trainable(init_model(config, seed=0))
        return nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)

    trainable, frozen = mesh_lib.init_sharded(init, mesh_lib.weight_shardings(config, mesh))
    rng = np.random.default_rng(0)
    positions = np.arange(P - 1, T)
    group = 4 if rows % 4 == 0 else None
    tokens = rng.integers(0, config.vocab_size, (rows, T))
    if group:  # G responses to one prompt, as a rollout makes them (the loss runs it once)
        tokens[:, :P] = np.repeat(tokens[::group, :P], group, axis=0)
    batch = loss_lib.Batch(
        tokens=jnp.asarray(tokens, jnp.int32),
        mask=jnp.ones((rows, T), bool),
        response_mask=jnp.asarray(np.broadcast_to(positions >= P, (rows, A))),
        advantages=jnp.asarray(rng.normal(size=rows), jnp.float32),
        old_logp=jnp.asarray(rng.normal(-2.0, 0.5, (rows, A)), jnp.float32),
        ref_logp=jnp.asarray(rng.normal(-2.0, 0.5, (rows, A)), jnp.float32),
    )

    def run_config(policy):
        """The base config at this shape (G rows per prompt, or 1 where rows do not group)."""
        c = base_config()
        c.rollout.prompts_per_step = rows // (group or 1)
        c.rollout.responses_per_prompt = group or 1
        c.rollout.max_new_tokens = A - 1
        c.policy_update.name = policy
        return c

    loss_fn = builders.loss_fn(run_config("grpo"), config)

    def timed(compiled, call) -> tuple[list[float], dict]:
        out = call(compiled)  # warm-up
        jax.block_until_ready(out)
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = call(compiled)
            jax.block_until_ready(out)
            seconds.append(time.perf_counter() - t0)
        return seconds, out

    results = []

    def record(kind, seconds, compile_s, compiled, est, extra=""):
        analysis = compiled.memory_analysis()
        peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
        results.append(
            dict(
                model=name,
                kind=kind,
                shape=f"{rows}x{T}",
                remat=remat,
                median=statistics.median(seconds),
                min=min(seconds),
                tok_s=rows * T / statistics.median(seconds),
                compile=compile_s,
                peak=None if peak is None else peak / GIB,
                temp=None if analysis is None else analysis.temp_size_in_bytes / GIB,
                estimate=est / GIB,
                extra=extra,
                device=f"{device.device_kind} (jax {jax.__version__}, flax {flax.__version__})",
            )
        )

    # fwd+bwd alone
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    t0 = time.perf_counter()
    compiled = grad_fn.lower(trainable, batch=batch, frozen=frozen).compile()
    compile_s = time.perf_counter() - t0
    seconds, _ = timed(compiled, lambda c: c(trainable, batch=batch, frozen=frozen))
    est = estimate(config, rows, "grpo")
    record("fwd+bwd", seconds, compile_s, compiled, est.update_peak - est.step_buffers)
    del compiled

    for kind, policy in (("grpo", "grpo"), ("gxpo K=5", "gxpo")):
        c = run_config(policy)  # GXPO at the defaults: K = 5, alpha = 0.5, the gate on
        tx = builders.policy_update(c)
        own = jax.tree.map(jnp.copy, trainable)  # the step donates its params and state
        state = init_state(own, jax.jit(tx.init)(own), {"position": 0})
        update = builders.update_step(c, config, tx)
        t0 = time.perf_counter()
        compiled = update.lower(state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        carry = [state]

        def call(c, carry=carry):
            carry[0], metrics = c(carry[0], frozen, batch)
            return metrics

        seconds, metrics = timed(compiled, call)
        evals = int(metrics["grad_evals"])
        extra = f"{evals} grad evals" + (
            f", active={int(metrics['gxpo/active'])}" if policy == "gxpo" else ""
        )
        record(kind, seconds, compile_s, compiled, estimate(config, rows, policy).update_peak,
               extra)  # fmt: skip
        del compiled, carry[:]
    return results


# ----------------------------------------------------------------------------- driver


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(rows: list[dict], device: str) -> str:
    head = (
        f"{'model':<14}{'kind':<10}{'B x T':>10}{'remat':>7}{'median s':>10}{'min s':>8}"
        f"{'tok/s':>10}{'compile s':>11}{'peak GiB':>10}{'temp GiB':>10}{'est GiB':>9}  notes"
    )
    lines = [f"device: {device}", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<14}{r['kind']:<10}{r['shape']:>10}{str(r['remat']):>7}"
            f"{r['median']:>10.3f}{r['min']:>8.3f}{r['tok_s']:>10.0f}{r['compile']:>11.1f}"
            f"{_fmt(r['peak'], '.2f'):>10}{_fmt(r['temp'], '.2f'):>10}{r['estimate']:>9.2f}"
            f"  {r['extra']}"
        )
    by = {(r["model"], r["kind"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        grpo, gxpo = by.get((model, "grpo")), by.get((model, "gxpo K=5"))
        if grpo and gxpo:
            lines.append(f"{model}: gxpo_over_grpo={gxpo['median'] / grpo['median']:.2f}")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    if args.child:
        print(json.dumps(_run_model(args.child, args)), flush=True)
        return
    env = dict(os.environ)
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    # Let the process use most of the GPU (JAX preallocates 75% by default).
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    rows = []
    start = time.perf_counter()
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, f"--child={name}", *sys.argv[1:]]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr[-6000:])
            raise SystemExit(f"{name}: failed (exit {out.returncode})")
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(_table(rows, rows[0]["device"]))  # the parent never touches the device
    print(f"total wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
