"""The real `Trainer` for a few steps on one GPU at the paper's shapes: rollout throughput against
the card's memory bandwidth, GRPO and GXPO update seconds, and peak memory against the estimate
(a script, not a test).

    python benchmarks/gpu_e2e.py                     # qwen2.5-1.5b, llama3.2-3b (:h100x1)
    python benchmarks/gpu_e2e.py --models=qwen2.5-1.5b --max-new-tokens=1024
    python benchmarks/gpu_e2e.py --cpu-smoke --out=/tmp/e2e   # tiny shapes on CPU (the suite)

No model files and no network: random weights of each preset's shape (`model.path = ""`, the
character tokenizer a random init gets), bf16, LoRA 128/256 on q/k/v/o, the model config's
`:h100x1` hardware preset (remat, micro-batches, sampling chunks) and the paper's 128 prompts x 5
responses of the generated `arith` task (short prompts: one 64-token bucket). Random weights
never emit an end token, so the responses end at lengths drawn per row from a long-tailed
distribution (`--lengths`, the benchmark-only `rollout.benchmark_lengths`); where this
checkout's config has no such field, every row decodes exactly `--max-new-tokens` (the
sampler's `ignore_eos`) and the output says `lengths: fixed`.

Each model runs in its own subprocess (the parent never touches the device):

  1. a GRPO Trainer (`policy_update.name = "grpo"`) runs one warm-up step (compiling), then
     `--steps` timed steps: rollout (sampling, rewards, the old / reference log-prob passes)
     and update, as `Trainer.train_step` reports them; the sampler's own seconds and tokens are
     read off its calls;
  2. a GXPO Trainer (the config's own policy update, K = 5) replays the last rollout batch of
     step 1, so that it times only its update: one warm-up step, then `--steps` timed ones.

Printed per model: rollout tokens/s (kept response tokens / sampling seconds) and its fraction
of the card's memory-bandwidth limit, the update seconds of GRPO and GXPO and their ratio, and
the device's peak memory (`memory_stats()["peak_bytes_in_use"]`, cumulative: after phase 1 it
covers the sampler, the log-prob passes and the GRPO update; after phase 2 the GXPO update too)
against `gxpo.train.memory.estimate_memory` at the run's real prompt length. The table goes to
stdout, and to `<out>/<card>.md` with every number in `<out>/<card>.json`.

The bandwidth limit: a decode step reads every weight once (the LoRA adapters folded in) and the
keys and values of each live row (its prompt's once per group of G rows, then its own tokens), so
the sampling calls at best take `bytes / bandwidth` with

    bytes = sum over calls of  steps * W + 2 L K H b * sum over rows (len * P / G + len^2 / 2)

(W the weight bytes one step reads, steps the longest row of the call, len a row's response
length, P the prompt slots, b the compute dtype's bytes); the fraction printed is that time over
the measured sampling seconds. Bandwidth by `device_kind` (`BANDWIDTH_TB_S`), or `--bandwidth`
(TB/s) for any other card.

Needs jax, flax, optax, orbax-checkpoint, numpy and this repository, plus what the Trainer
imports: ml_collections, transformers and tokenizers (the character tokenizer), tqdm and
tensorboardX (its logger); the reward workers need math_verify. `python benchmarks/gpu_e2e.py
--check-imports` lists the ones missing on a machine, before any device work. The pure-Python
ones can travel as wheels to a machine with no package index: `pip download --no-deps
--only-binary=:all: -d wheels ml_collections tensorboardX math-verify latex2sympy2_extended
antlr4-python3-runtime` where there is one, then `pip install --no-index --no-deps --target
DIR wheels/*.whl` there, with DIR on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODELS = {"qwen2.5-1.5b": "qwen2p5_1p5b", "llama3.2-3b": "llama3b"}  # preset -> configs/<file>
# Peak memory bandwidth (TB/s) by `device_kind`, first match (case-insensitive).
BANDWIDTH_TB_S = (
    (r"H200", 4.8),
    (r"H100.*PCIe", 2.0),
    (r"H100", 3.35),
    (r"A100.*80GB", 2.0),
    (r"A100", 1.55),
    (r"\bL4\b", 0.3),
)
# Modules the Trainer's path imports beyond jax / flax / optax / numpy (`--check-imports`).
NEEDED = ("orbax.checkpoint", "ml_collections", "transformers", "tokenizers", "tqdm",
          "tensorboardX", "math_verify")  # fmt: skip
GIB = 2**30


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated presets")
    p.add_argument("--hardware", default="h100x1", help="the configs' hardware preset")
    p.add_argument("--prompts", type=int, default=128, help="Q, prompts per step")
    p.add_argument("--responses", type=int, default=5, help="G, responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=512, help="A, the response budget")
    p.add_argument(
        "--lengths",
        default="auto",
        help="rollout.benchmark_lengths ('lognormal:<median>:<sigma>'); 'auto': median A/4, "
        "sigma 1; 'fixed': every row decodes A tokens",
    )
    p.add_argument("--steps", type=int, default=1, help="timed steps per phase (after a warm-up)")
    p.add_argument("--bandwidth", type=float, default=0.0, help="TB/s; 0: by device_kind")
    p.add_argument("--out", default=str(REPO / "results" / "gpu"), help="output directory")
    p.add_argument("--timeout", type=float, default=540.0, help="seconds per model's process")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, 2 steps each")
    p.add_argument("--check-imports", action="store_true", help="list missing modules, exit")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # one model, JSON out
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.models, args.prompts, args.responses, args.max_new_tokens = "tiny", 2, 2, 8
    if args.lengths == "auto":
        args.lengths = f"lognormal:{max(args.max_new_tokens // 4, 1)}:1.0"
    return args


def bandwidth_tb_s(device_kind: str, override: float = 0.0) -> float | None:
    """The card's peak memory bandwidth in TB/s: `override` if set, else by `device_kind`."""
    if override > 0:
        return override
    for pattern, tb_s in BANDWIDTH_TB_S:
        if re.search(pattern, device_kind, re.I):
            return tb_s
    return None


def decode_bytes(calls: list[dict], weight_bytes: int, kv_bytes_per_slot: int, group: int) -> float:
    """The bytes the sampling calls read at best (module docstring): per call, its steps times
    the weights, plus each row's keys and values at each of its steps."""
    total = 0.0
    for call in calls:
        lengths, prompt = call["lengths"], call["prompt_slots"]
        total += max(lengths, default=0) * weight_bytes
        total += kv_bytes_per_slot * sum(n * prompt / group + n * n / 2 for n in lengths)
    return total


# ----------------------------------------------------------------------------- one model


def _config(name: str, args: argparse.Namespace, policy: str) -> Any:
    """The model config's hardware preset, overridden to the benchmark's job."""
    file = "qwen2p5_1p5b" if args.cpu_smoke else MODELS[name]  # smoke: the same preset code
    spec = importlib.util.spec_from_file_location(file, REPO / f"configs/{file}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(args.hardware)
    c.model.path, c.model.preset = "", name  # random weights of the preset's shape
    c.data.train, c.data.eval = "arith", ()
    c.data.max_prompt_tokens = 64  # arith prompts in the character tokenizer: one bucket
    c.rollout.prompt_bucket = 64
    c.rollout.prompts_per_step, c.rollout.responses_per_prompt = args.prompts, args.responses
    c.rollout.max_new_tokens = args.max_new_tokens
    c.policy_update.name = policy
    c.eval.at_start, c.eval.every = False, 0
    c.train.steps = 1 + args.steps
    c.train.checkpoint_every = 0
    c.train.quiet = True
    c.logging.samples_per_step = 0
    c.mesh.memory_check = "warn"  # measure even where the estimate says it will not fit
    if args.cpu_smoke:
        c.model.dtype, c.model.lora_rank, c.model.lora_alpha = "float32", 4, 8.0
        c.train.micro_batches, c.rollout.sample_chunks = 2, 2  # accumulation and chunks run
    if args.lengths != "fixed" and "benchmark_lengths" in c.rollout:
        c.rollout.benchmark_lengths = args.lengths
    return c


def _run_model(name: str, args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    """Runs one model's two phases, `emit`ting its results after each."""
    # Imported here: only the per-model child processes touch (and preallocate) the device.
    import flax
    import jax
    import numpy as np

    from gxpo.train import builders
    from gxpo.train import memory as memory_lib
    from gxpo.train import mesh as mesh_lib
    from gxpo.train import trainer as trainer_lib

    device = jax.devices()[0]
    peak = lambda: (device.memory_stats() or {}).get("peak_bytes_in_use")
    calls, sample_seconds = [], [0.0]
    sample = trainer_lib.sample

    def timed_sample(*a, **kw):  # the sampler's own seconds and every row's length
        t0 = time.perf_counter()
        out = jax.block_until_ready(sample(*a, **kw))
        sample_seconds[0] += time.perf_counter() - t0
        lengths = np.asarray(jax.device_get(out.lengths)).tolist()
        calls.append(dict(lengths=lengths, prompt_slots=out.tokens.shape[1] - max_new))
        return out

    max_new = args.max_new_tokens
    trainer_lib.sample = timed_sample  # before the Trainer binds it
    workdir = tempfile.mkdtemp(prefix="gxpo_e2e_")
    result: dict[str, Any] = dict(model=name)

    # Phase 1: GRPO, rollouts and updates.
    c = _config(name, args, "grpo")
    lengths = args.lengths if "benchmark_lengths" in c.rollout else "fixed"
    t0 = time.perf_counter()
    trainer = trainer_lib.Trainer(c, workdir + "/grpo")
    if lengths == "fixed":  # no benchmark lengths in this checkout: every row decodes A tokens
        trainer.rollout_sampling = dataclasses.replace(trainer.rollout_sampling, ignore_eos=True)
    batches, rollout = [], {"fn": trainer.rollout}

    def keep_batch(examples, key):
        batch, metrics = rollout["fn"](examples, key)
        batches[:] = [(batch, metrics)]
        return batch, metrics

    trainer.rollout = keep_batch
    trainer.train_step()  # warm-up: compiles the sampler, the log-prob passes, the update
    result["warmup_s"] = time.perf_counter() - t0
    calls.clear()
    sample_seconds[0] = 0.0
    steps = [trainer.train_step() for _ in range(args.steps)]
    if not calls:
        raise RuntimeError(
            "the Trainer sampled without gxpo.train.trainer.sample: time its sampler"
        )
    model_config, mesh = trainer.model_config, trainer.mesh
    sizes = mesh_lib.mesh_sizes(mesh)
    tokens = sum(sum(call["lengths"]) for call in calls)
    prompt_slots = calls[0]["prompt_slots"]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.frozen))
    if not model_config.tie_embeddings:  # the input embedding is gathered, not read whole
        weight_bytes -= trainer.frozen["embed"].nbytes
    kv_slot = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim
    kv_slot *= np.dtype(model_config.dtype).itemsize
    best = decode_bytes(calls, weight_bytes, kv_slot, args.responses)
    tb_s = bandwidth_tb_s(device.device_kind, args.bandwidth)
    sampling_s = sample_seconds[0]
    result.update(
        lengths=lengths,
        rows=args.prompts * args.responses,
        prompt_slots=prompt_slots,
        max_new_tokens=max_new,
        response_tokens_mean=tokens / max(sum(len(call["lengths"]) for call in calls), 1),
        sampling_calls=len(calls) // max(args.steps, 1),
        sampling_s=sampling_s / args.steps,
        rollout_s=float(np.mean([m["rollout_seconds"] for m in steps])),
        rollout_tok_s=tokens / sampling_s,
        bandwidth_tb_s=tb_s,
        bandwidth_fraction=None if tb_s is None else best / (tb_s * 1e12) / sampling_s,
        limit_tok_s=None if tb_s is None else tokens / (best / (tb_s * 1e12)),
        grpo_update_s=float(np.mean([m["update_seconds"] for m in steps])),
        grpo_grad_evals=steps[-1]["grad_evals"],
        peak_grpo_gib=None if peak() is None else peak() / GIB,
    )
    # The estimate at the run's real prompt length (the config's bound is max_prompt_tokens).
    c = _config(name, args, "grpo")
    c.data.max_prompt_tokens = prompt_slots
    estimates = {}
    for policy in ("grpo", "gxpo"):
        c.policy_update.name = policy
        work = memory_lib.workload(c, builders.step_buffers(c))
        estimates[policy] = memory_lib.estimate_memory(model_config, sizes, work)
    limit = (device.memory_stats() or {}).get("bytes_limit")
    result.update(
        estimate_grpo_gib=max(estimates["grpo"].update_peak, estimates["grpo"].sample_peak) / GIB,
        estimate_gib=estimates["gxpo"].peak / GIB,
        estimate={k: v / GIB for k, v in dataclasses.asdict(estimates["gxpo"]).items()},
        bytes_limit_gib=None if limit is None else limit / GIB,
        device=f"{device.device_kind} (jax {jax.__version__}, flax {flax.__version__})",
        device_kind=device.device_kind,
        mesh=sizes,
        remat=model_config.remat,
        micro_batches=c.train.micro_batches,
        sample_chunks=c.rollout.sample_chunks,
    )
    emit(result)  # phase 1's numbers, should phase 2 not finish in time
    batch = batches[0]
    trainer.close()
    rollout.clear()
    del trainer, keep_batch, steps
    gc.collect()  # the GRPO Trainer's weights and state leave the device before GXPO's

    # Phase 2: GXPO's update on the same rollout batch.
    trainer_lib.sample = sample
    c = _config(name, args, "gxpo")
    trainer = trainer_lib.Trainer(c, workdir + "/gxpo")
    trainer.rollout = lambda examples, key: (batch[0], dict(batch[1]))
    trainer.train_step()  # warm-up: compiles GXPO's update
    steps = [trainer.train_step() for _ in range(args.steps)]
    result.update(
        gxpo_update_s=float(np.mean([m["update_seconds"] for m in steps])),
        gxpo_grad_evals=steps[-1]["grad_evals"],
        gxpo_active=steps[-1].get("gxpo/active"),
        peak_gib=None if peak() is None else peak() / GIB,
    )
    result["gxpo_over_grpo"] = result["gxpo_update_s"] / result["grpo_update_s"]
    trainer.close()
    emit(result)


# ----------------------------------------------------------------------------- driver


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    """The printed table: one row per model."""
    head = (
        f"{'model':<14}{'rows x A':>10}{'tok/s':>9}{'of BW':>7}{'sample s':>10}{'rollout s':>10}"
        f"{'GRPO s':>8}{'GXPO s':>8}{'ratio':>7}{'peak GiB':>10}{'est GiB':>9}"
    )
    lines = [f"device: {results[0]['device']}", head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['model']:<14}{r['rows']:>5} x{r['max_new_tokens']:>4}{r['rollout_tok_s']:>9.0f}"
            f"{_fmt(r['bandwidth_fraction'], '.0%'):>7}{r['sampling_s']:>10.2f}"
            f"{r['rollout_s']:>10.2f}{r['grpo_update_s']:>8.2f}"
            f"{_fmt(r.get('gxpo_update_s'), '.2f'):>8}{_fmt(r.get('gxpo_over_grpo'), '.2f'):>7}"
            f"{_fmt(r.get('peak_gib', r['peak_grpo_gib']), '.1f'):>10}{r['estimate_gib']:>9.1f}"
        )
    for r in results:
        lines.append(
            f"{r['model']}: lengths {r['lengths']} (mean {r['response_tokens_mean']:.0f} of "
            f"{r['max_new_tokens']}), prompt {r['prompt_slots']} slots, "
            f"{r['sampling_calls']} sampling calls, {r['micro_batches']} micro-batches, "
            f"remat={r['remat']}; bandwidth {_fmt(r['bandwidth_tb_s'], '.2f')} TB/s, limit "
            f"{_fmt(r['limit_tok_s'], '.0f')} tok/s; grad evals GRPO {r['grpo_grad_evals']:.0f}, "
            f"GXPO {_fmt(r.get('gxpo_grad_evals'), '.0f')}; peak after GRPO "
            f"{_fmt(r['peak_grpo_gib'], '.1f')} GiB (est {r['estimate_grpo_gib']:.1f}); "
            f"warm-up {r['warmup_s']:.0f} s"
        )
    return "\n".join(lines)


def card_name(device_kind: str) -> str:
    """A file name for the card: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "device"


def missing_modules() -> list[str]:
    """The modules of `NEEDED` that do not import here."""
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main() -> None:
    args = _args()
    if args.check_imports:
        missing = missing_modules()
        print("missing: " + (", ".join(missing) if missing else "none"))
        raise SystemExit(1 if missing else 0)
    if args.child:
        _run_model(args.child, args, lambda r: print("RESULT " + json.dumps(r), flush=True))
        return
    env = dict(os.environ)
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # as the presets assume
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, start = [], time.perf_counter()
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, f"--child={name}", *sys.argv[1:]]
        text = lambda x: x if isinstance(x, str) else (x or b"").decode(errors="replace")
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            stdout, stderr = run.stdout, run.stderr
            failed = f"exit {run.returncode}" if run.returncode else ""
        except subprocess.TimeoutExpired as e:  # keeps what the child had printed
            stdout, stderr = text(e.stdout), text(e.stderr)
            failed = f"over --timeout={args.timeout:.0f} s"
        found = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if failed:
            sys.stderr.write(stderr[-6000:])
            print(f"{name}: failed ({failed}); {len(found)} of 2 phases done", file=sys.stderr)
        if not found:
            continue
        results.append(json.loads(found[-1][len("RESULT ") :]))
        # Written after each model: a later one that fails or times out keeps this one's.
        card = card_name(results[0]["device_kind"])
        (out_dir / f"{card}.json").write_text(json.dumps(results, indent=1) + "\n")
        command = " ".join(["python benchmarks/gpu_e2e.py", *sys.argv[1:]])
        (out_dir / f"{card}.md").write_text(f"`{command}`\n\n```\n{table(results)}\n```\n")
    if not results:
        raise SystemExit("no model ran")
    print(table(results))
    print(f"wrote {out_dir / card_name(results[0]['device_kind'])}.{{json,md}}; "
          f"total wall {time.perf_counter() - start:.0f} s")  # fmt: skip
    if len(results) < len(args.models.split(",")):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
