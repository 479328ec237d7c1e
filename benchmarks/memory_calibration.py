"""The memory estimate (`gxpo.train.memory.estimate_memory`) against XLA's own buffer sizes for
the same programs, compiled but never run (a script, not a test).

    python benchmarks/memory_calibration.py                    # every case below, on CPU
    python benchmarks/memory_calibration.py --cases=small      # one of CASES

Per case (a model shape, rows of G responses, prompt and response lengths, remat) it compiles,
through the builders the Trainer uses, with abstract weights (`jax.eval_shape`: nothing is
allocated), and reads `compiled.memory_analysis()`:

  resident      the update step's argument bytes less the batch     <-> params + optimizer state
  fwd+bwd       temporaries of value_and_grad of the loss (one micro-batch)
                                               <-> activations + max(logits, one layer)
  grpo / gxpo   the update step's temporaries less fwd+bwd's         <-> step buffers
  log-probs     temporaries of the trainer's old / reference pass    <-> log-prob pass
  sampler       temporaries + output of the sampler                  <-> KV cache + decode weights

and prints the estimate beside each, with the relative error. These are XLA:CPU's figures: its
buffer assignment and fusion differ from XLA:GPU's, and it upcasts bf16 weights to float32 copies
for its matmuls, so the cases run in float32 (the estimate's formulas take the compute dtype's
bytes); `benchmarks/gpu_e2e.py` compares the estimate with a GPU's measured peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gxpo.models import get_preset, init_model, split_trainable
from gxpo.models.config import ModelConfig
from gxpo.rl.sampler import SamplingConfig, sample
from gxpo.train import builders, updates
from gxpo.train import loss as loss_lib
from gxpo.train import memory as memory_lib
from gxpo.train.defaults import base_config
from gxpo.train.state import init_state

MIB = 2**20
POLICIES = ("grpo", "sfpo", "gxpo")
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
# A small shape whose buffers dwarf XLA's fixed overheads, still quick to compile.
SMALL = ModelConfig(
    vocab_size=8192, dim=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
    ffn_dim=512, max_position_embeddings=4096,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # "small" or a preset name
    rows: int  # B rows of one update micro-batch (whole groups of G)
    group: int  # G
    prompt: int  # P prompt tokens
    answer: int  # A response tokens
    remat: bool
    lora_rank: int = 8
    micro: int = 1  # the update's micro-batches (gradient accumulation); rows is one of them

    def config(self) -> ModelConfig:
        base = SMALL if self.model == "small" else get_preset(self.model)
        return dataclasses.replace(
            base, dtype="float32", param_dtype="float32", remat=self.remat,
            lora_rank=self.lora_rank, lora_alpha=2.0 * self.lora_rank,
        )  # fmt: skip


CASES = {
    "small": Case("small", rows=8, group=4, prompt=64, answer=64, remat=True),
    "small-long": Case("small", rows=8, group=4, prompt=128, answer=256, remat=True),
    "small-noremat": Case("small", rows=8, group=4, prompt=64, answer=64, remat=False),
    "small-micro": Case("small", rows=4, group=4, prompt=64, answer=64, remat=True, micro=2),
    "smollm2": Case("smollm2-135m", rows=8, group=4, prompt=128, answer=128, remat=True),
    "smollm2-long": Case("smollm2-135m", rows=4, group=4, prompt=128, answer=512, remat=True),
    "smollm2-noremat": Case("smollm2-135m", rows=8, group=4, prompt=128, answer=128, remat=False),
}


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def measure(
    case: Case, policies: tuple[str, ...] = POLICIES, passes: bool = True
) -> dict[str, int]:
    """XLA's bytes for each component of `case` (see the module docstring): fwd+bwd, the
    update step of each of `policies` and, with `passes`, the log-prob pass and the sampler."""
    cfg = case.config()

    def init():
        _, trainable, frozen = split_trainable(init_model(cfg, seed=0))
        return nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)

    trainable, frozen = jax.eval_shape(init)
    B, G, P, A = case.rows, case.group, case.prompt, case.answer
    T, W = P + A, A + 1  # W: the response window, the last prompt token and A responses
    S = jax.ShapeDtypeStruct

    def rows_of(rows: int) -> loss_lib.Batch:
        return loss_lib.Batch(
            tokens=S((rows, T), jnp.int32),
            mask=S((rows, T), bool),
            response_mask=S((rows, W), bool),
            advantages=S((rows,), jnp.float32),
            old_logp=S((rows, W), jnp.float32),
            ref_logp=S((rows, W), jnp.float32),
        )

    batch, update_batch = rows_of(B), rows_of(B * case.micro)
    c = base_config()
    c.rollout.prompts_per_step, c.rollout.responses_per_prompt = B * case.micro // G, G
    c.rollout.max_new_tokens = A
    c.train.micro_batches = case.micro
    out = {}
    grad = jax.jit(jax.value_and_grad(builders.loss_fn(c, cfg), has_aux=True))
    fwd_bwd = grad.lower(trainable, batch=batch, frozen=frozen).compile().memory_analysis()
    out["fwd+bwd"] = fwd_bwd.temp_size_in_bytes
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(update_batch))
    for policy in policies:
        c.policy_update.name = policy
        tx = builders.policy_update(c)
        state = jax.eval_shape(
            lambda t, tx=tx: init_state(t, tx.init(t), {"position": 0}), trainable
        )
        update = builders.update_step(c, cfg, tx)
        m = update.lower(state, frozen, update_batch).compile().memory_analysis()
        out[policy] = m.temp_size_in_bytes - out["fwd+bwd"]
        out["resident"] = m.argument_size_in_bytes - batch_bytes
    if passes:
        logprobs = loss_lib.batch_logprobs.lower(
            trainable, frozen, None, batch.tokens, batch.mask, model_config=cfg, temperature=1.0,
            window=W, with_old=True, reference="adapters_off", group_size=G,
        )  # fmt: skip
        out["log-probs"] = logprobs.compile().memory_analysis().temp_size_in_bytes
        sampling = SamplingConfig(max_new_tokens=A, num_samples=G, eos_ids=(0,))
        weights = loss_lib.merge_weights(trainable, frozen)
        prompts = S((B // G, P), jnp.int32)
        m = sample.lower(weights, cfg, prompts, S((B // G, P), bool), jax.random.key(0), sampling)
        m = m.compile().memory_analysis()
        out["sampler"] = m.temp_size_in_bytes + m.output_size_in_bytes
    return out


def estimate(case: Case, policy: str) -> memory_lib.MemoryEstimate:
    work = memory_lib.Workload(
        update_rows=case.rows,
        seq_len=case.prompt + case.answer,
        logits_len=case.answer + 1,
        sample_rows=case.rows,
        sample_len=case.prompt + case.answer,
        step_buffers=updates.get(policy).step_buffers + (1 if case.micro > 1 else 0),
        group_size=case.group,
    )
    return memory_lib.estimate_memory(case.config(), ONE_DEVICE, work)


def compare(case: Case) -> list[tuple[str, int, int]]:
    """(component, XLA bytes, estimated bytes) of `case`."""
    xla = measure(case)
    est = {policy: estimate(case, policy) for policy in POLICIES}
    grpo = est["grpo"]
    return [
        ("resident", xla["resident"], grpo.resident),
        ("fwd+bwd", xla["fwd+bwd"], grpo.activations + max(grpo.logits, grpo.layer)),
        *((f"{p} step", xla[p], est[p].step_buffers) for p in POLICIES),
        ("log-probs", xla["log-probs"], grpo.logprob_pass),
        ("sampler", xla["sampler"], grpo.kv_cache + grpo.sampler),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated of {list(CASES)}")
    args = p.parse_args()
    print(f"{'case':<16}{'component':<12}{'XLA MiB':>10}{'est MiB':>10}{'error':>8}")
    for name in args.cases.split(","):
        case, t0 = CASES[name], time.perf_counter()
        for component, xla, est in compare(case):
            error = (est - xla) / xla if xla else float("nan")
            print(f"{name:<16}{component:<12}{xla / MIB:>10.2f}{est / MIB:>10.2f}{error:>+8.0%}")
        print(f"{name:<16}({case}; {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
