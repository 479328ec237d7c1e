"""A tiny random model on the arithmetic task: the whole pipeline (rollout, reward, GXPO update,
evaluation, checkpoint) in a few compiles. It is what the end-to-end tests run, and a smoke test for
config changes.

Command:

    python launch.py --config=configs/tiny.py --workdir=/tmp/gxpo_tiny

Hardware: any CPU.

Expected result: nothing learned. Random weights and a character tokenizer: pass@1 on the 8 held-out
problems stays 0.0 at steps 0, 2 and 3, and the run leaves metrics.jsonl (3 steps, 3 gradient
evaluations each), eval.jsonl, TensorBoard events and checkpoints at steps 2 and 3 in the work
directory.

Run time: 45 CPU seconds, almost all of it compiling (1 min 42 s of wall clock on this project's
2-core CPU beside other jobs, at a load average of 8.6).
"""

from gxpo.train.defaults import apply_variants, base_config


def get_config(arg: str = ""):
    c = base_config()
    c.model.path = ""  # random init
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.lora_rank = 4
    c.model.lora_alpha = 8.0
    c.data.train = "arith"
    c.data.eval = ("arith",)
    c.data.max_prompt_tokens = 128
    c.data.arith.eval_size = 8
    c.rollout.prompts_per_step = 2
    c.rollout.responses_per_prompt = 2
    c.rollout.max_new_tokens = 8
    c.rollout.prompt_bucket = 16
    c.rollout.length_bucket = 4
    c.optimizer.lr = 1e-2
    c.policy_update.gate.warmup = 2
    c.policy_update.gate.window = 2
    c.eval.every = 2
    c.eval.n_samples = 2
    c.eval.pass_k = (1, 2)
    c.eval.max_new_tokens = 8
    c.eval.prompts_per_batch = 4
    c.train.steps = 3
    c.train.checkpoint_every = 2
    c.train.quiet = True
    return apply_variants(c, arg)  # `:authors`: gxpo.train.defaults.authors_recipe
