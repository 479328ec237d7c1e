"""The training loop: rollout -> reward -> advantages -> update(s) -> log / eval / checkpoint.

Shape key: Q prompts per step, G responses per prompt, B = Q * G, P prompt tokens (bucketed),
N max new tokens, T = P + N.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gxpo.models.char_tokenizer import char_tokenizer
from gxpo.models.checkpoints import load_pretrained
from gxpo.models.config import ModelConfig
from gxpo.models.lora import split_trainable
from gxpo.models.presets import get_preset
from gxpo.models.transformer import init_model
from gxpo.optim import ZScoreGate
from gxpo.rl import grpo
from gxpo.rl.answers import canonical_answer, extract_answer
from gxpo.rl.data import ArithTask, BatchIterator, Example, build_prompt, encode_prompts
from gxpo.rl.data import load_examples as load_dataset
from gxpo.rl.evaluate import benchmark_table, summarize
from gxpo.rl.rewards import RewardScorer
from gxpo.rl.sampler import SamplingConfig, end_token_ids, sample, split_prompts
from gxpo.train import memory as memory_lib
from gxpo.train import mesh as mesh_lib
from gxpo.train import rows as rows_lib
from gxpo.train import step as step_lib
from gxpo.train.checkpoint import Checkpointer
from gxpo.train.config import resolve_model_path, validate
from gxpo.train.logging import ProgressBar, RunLogger


def load_model(
    m: ml_collections.ConfigDict, seed: int, mesh: jax.sharding.Mesh
) -> tuple[ModelConfig, dict, dict, Any]:
    """(model config, trainable weights, frozen weights, tokenizer) for the config's `model`
    group, placed on `mesh`. A random init runs as one jit with out_shardings, so no device
    ever holds more than its shards."""
    options = dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype or m.dtype,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_targets=tuple(m.lora_targets),
        remat=m.remat,
    )
    if m.path == "":
        config = get_preset(m.preset, **options)

        def init():
            _, trainable, frozen = split_trainable(init_model(config, seed=seed))
            return _pure(trainable), _pure(frozen)

        shardings = mesh_lib.weight_shardings(config, mesh)
        trainable, frozen = mesh_lib.init_sharded(init, shardings)
        return config, trainable, frozen, char_tokenizer()  # random models have no tokenizer
    model, tokenizer = load_pretrained(resolve_model_path(m.path), seed=seed, **options)
    if tokenizer is None:
        raise ValueError(
            f"config.model.path={m.path!r} has no tokenizer files (tokenizer.json, ...); "
            "training needs the checkpoint's tokenizer"
        )
    shardings = mesh_lib.weight_shardings(model.config, mesh)
    _, trainable, frozen = split_trainable(model)
    trainable, frozen = _pure(trainable), _pure(frozen)
    placed = mesh_lib.place(
        (trainable, frozen), (mesh_lib.like(shardings, trainable), mesh_lib.like(shardings, frozen))
    )
    return model.config, *placed, tokenizer


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _schedule(opt: ml_collections.ConfigDict, total_updates: int) -> optax.Schedule | float:
    if opt.schedule == "constant" and not opt.warmup_steps:
        return opt.lr
    decay = max(total_updates - opt.warmup_steps, 1)
    if opt.schedule == "constant":
        main = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(opt.lr, decay)
    else:
        main = optax.linear_schedule(opt.lr, 0.0, decay)
    warm = optax.linear_schedule(0.0, opt.lr, opt.warmup_steps)
    return optax.join_schedules([warm, main], [opt.warmup_steps])


_STEP_BUFFERS = {"grpo": 4, "sfpo": 8, "gxpo": 12}  # registry: replaced at merge


def _evals_per_update(pu: ml_collections.ConfigDict) -> int:
    """Inner-optimizer updates per policy update while active (schedules count these)."""
    if pu.name == "gxpo":
        return 3 if pu.gxpo.probe_state == "keep" else 1
    return pu.sfpo.fast_steps + 1 if pu.name == "sfpo" else 1


@dataclasses.dataclass
class Counters:
    """Cumulative run totals, checkpointed with the params."""

    backward_passes: int = 0
    wall_seconds: float = 0.0


class Trainer:
    """Builds everything a run needs from a validated config; `run()` trains."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        validate(config)
        mesh_lib.initialize_distributed(config.mesh)  # before any other JAX call
        self.config = c = config
        self.mesh = mesh_lib.make_mesh(c.mesh)
        self.is_main = jax.process_index() == 0  # only process 0 writes files and prints
        self.update_rows = (
            c.rollout.prompts_per_step * c.rollout.responses_per_prompt // c.train.mini_batches
        )
        rows_lib.check_rows(
            self.update_rows,
            self.mesh,
            "config.rollout.prompts_per_step * responses_per_prompt / train.mini_batches",
        )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        key = jax.random.key(c.train.seed)
        self.rollout_key, self.eval_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

        # Data first: a missing file fails before a model load.
        self.train_source = self._source(c.data.train, c.data.train_split)
        self.eval_sets = {name: self._eval_examples(name) for name in c.data.eval}
        self.train_iter = BatchIterator(
            self.train_source, c.rollout.prompts_per_step, seed=c.train.seed
        )
        self.scorer = RewardScorer()
        self.scorer.start()  # verifier workers warm up while the model loads and compiles

        self.model_config, self.trainable, self.frozen, self.tokenizer = load_model(
            c.model, c.train.seed, self.mesh
        )
        memory_lib.check_memory(
            c,
            self.model_config,
            self.mesh,
            step_buffers=_STEP_BUFFERS[c.policy_update.name],  # registry: replaced at merge
            verbose=not c.train.quiet,
        )
        self.eos_ids = end_token_ids(self.tokenizer)
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.eos_ids[0]
        )
        self.reference, self.reference_weights = "none", None
        if c.loss.kl_coef > 0:
            if c.model.lora_rank:
                self.reference = "adapters_off"
            else:  # full fine-tuning: the initial weights, copied (the trainable ones get donated)
                self.reference = "weights"
                self.reference_weights = jax.tree.map(jnp.copy, self.trainable)

        G = c.rollout.responses_per_prompt
        self.loss_config = step_lib.LossConfig(
            temperature=c.rollout.temperature,
            clip_eps_low=c.loss.clip_eps_low,
            clip_eps_high=c.loss.clip_eps_high,
            kl_coef=c.loss.kl_coef,
            kl_estimator=c.loss.kl_estimator,
            aggregation=c.loss.aggregation,
            max_len=c.rollout.max_new_tokens,
            old_logprobs=c.loss.old_logprobs,
            group_size=G,
        )
        loss_fn = functools.partial(
            step_lib.policy_loss, model_config=self.model_config, loss_config=self.loss_config
        )
        pu = c.policy_update
        total_updates = c.train.steps * c.train.mini_batches * _evals_per_update(pu)
        inner = step_lib.make_inner_optimizer(
            _schedule(c.optimizer, total_updates),
            weight_decay=c.optimizer.weight_decay,
            b1=c.optimizer.b1,
            b2=c.optimizer.b2,
            eps=c.optimizer.eps,
            grad_clip=c.optimizer.grad_clip,
        )
        gate = (
            ZScoreGate(pu.gate.window, pu.gate.warmup, float(pu.gate.threshold))
            if pu.gate.enabled
            else None
        )
        g = pu.gxpo
        self.tx = step_lib.make_policy_update(
            pu.name,
            inner,
            loss_fn,
            gxpo_kwargs=dict(
                virtual_depth=g.virtual_depth,
                reposition=g.reposition,
                active_threshold=g.active_threshold,
                ratio_clip=tuple(g.ratio_clip),
                scale_clip=tuple(g.scale_clip),
                probe_state=g.probe_state,
            ),
            sfpo_kwargs=dict(fast_steps=pu.sfpo.fast_steps, reposition=pu.sfpo.reposition),
            gate=gate,
        )
        shardings = mesh_lib.weight_shardings(self.model_config, self.mesh)
        trainable_sh = mesh_lib.like(shardings, self.trainable)
        frozen_sh = mesh_lib.like(shardings, self.frozen)
        opt_sh = mesh_lib.opt_state_shardings(self.tx, self.trainable, trainable_sh, self.mesh)
        self.opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(self.trainable)
        ranks = step_lib.Batch(*(1 if f == "advantages" else 2 for f in step_lib.Batch._fields))
        self.batch_sharding = mesh_lib.row_shardings(self.mesh, self.update_rows, ranks)
        update = step_lib.make_update_step(
            self.tx,
            loss_fn,
            info_prefix=pu.name,
            micro_batches=c.train.micro_batches,
            group_size=G,
            aggregation=c.loss.aggregation,
            in_shardings=(trainable_sh, opt_sh, frozen_sh, self.batch_sharding),
            out_shardings=(trainable_sh, opt_sh, mesh_lib.replicated(self.mesh)),
        )
        self.update = mesh_lib.on_mesh(self.mesh, update)
        self._sample_fn = mesh_lib.on_mesh(self.mesh, sample)
        self._logprobs_fn = mesh_lib.on_mesh(self.mesh, step_lib.batch_logprobs)
        # One sampling config per kind of call; each call adds its prompts' shared prefix.
        sampling = functools.partial(SamplingConfig, eos_ids=self.eos_ids, pad_id=self.pad_id)
        self.rollout_sampling = sampling(
            max_new_tokens=c.rollout.max_new_tokens,
            num_samples=G,
            temperature=c.rollout.temperature,
        )
        self.eval_sampling = sampling(
            max_new_tokens=c.eval.max_new_tokens,
            num_samples=c.eval.n_samples,
            temperature=c.eval.temperature,
        )

        self.step = 0
        self.counters = Counters()
        self.checkpointer = Checkpointer(self.workdir, max_to_keep=c.train.keep_checkpoints)
        self._maybe_resume()
        if self.is_main:
            (self.workdir / "config.json").write_text(c.to_json(indent=2))
        self.logger = RunLogger(self.workdir, start_step=self.step + 1)

    # ------------------------------------------------------------------ data

    def _source(self, name: str, split: str) -> list[Example] | ArithTask:
        if name == "arith":
            return ArithTask(**self.config.data.arith.to_dict())
        return load_dataset(name, split or None, self.config.data.data_dir or None)

    def _eval_examples(self, name: str) -> list[Example]:
        if name == "arith":
            examples = ArithTask(**self.config.data.arith.to_dict()).eval_examples()
        else:
            examples = load_dataset(name, None, self.config.data.data_dir or None)
        limit = self.config.eval.max_problems
        if limit and len(examples) > limit:  # a fixed subset, spread over the whole file
            order = np.random.default_rng(0).permutation(len(examples))[:limit]
            examples = [examples[i] for i in sorted(order)]
        return examples

    def _encode(self, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        d = self.config.data
        texts = [
            build_prompt(
                ex,
                self.tokenizer,
                d.template or None,
                chat=d.chat,
                system_prompt=d.system_prompt or None,
            )
            for ex in examples
        ]
        return encode_prompts(
            texts,
            self.tokenizer,
            max_length=d.max_prompt_tokens,
            pad_multiple=self.config.rollout.prompt_bucket,
        )

    # ------------------------------------------------------------------ rollout

    @property
    def weights(self) -> dict:
        return step_lib.merge_weights(self.trainable, self.frozen)

    def _sample(self, examples, key, sampling: SamplingConfig, *, own_rows, chunks=1):
        """Samples on the mesh, in `chunks` sequential calls of as many prompts each (one
        compilation, a KV cache for one chunk); returns the output, the decoded texts of this
        process's rows (`own_rows`) or of all rows, every row's length, and which rows the
        texts are."""
        tokens_QxP, mask_QxP = self._encode(examples)  # one prompt length for every chunk
        # A system prompt common to all prompts is prefilled once (valid for every chunk too).
        split = split_prompts(tokens_QxP, mask_QxP, self.config.rollout.prompt_bucket)
        sampling = dataclasses.replace(sampling, prompt_split=split)
        weights = self.weights
        outs = [
            self._sample_fn(
                weights,
                self.model_config,
                rows_lib.put_rows(self.mesh, tokens),
                rows_lib.put_rows(self.mesh, np.asarray(mask, bool)),
                key if chunks == 1 else jax.random.fold_in(key, chunk),
                sampling,
            )
            for chunk, (tokens, mask) in enumerate(
                zip(np.split(tokens_QxP, chunks), np.split(mask_QxP, chunks))
            )
        ]
        out = outs[0] if chunks == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *outs)
        P = tokens_QxP.shape[1]
        if own_rows:
            response_BxN, rows = rows_lib.host_rows(self.mesh, out.tokens[:, P:])
        else:
            response_BxN, rows = rows_lib.to_host(out.tokens[:, P:]), slice(None)
        lengths_B = rows_lib.to_host(out.lengths)
        texts = self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(response_BxN, lengths_B[rows])], skip_special_tokens=True
        )
        return out, texts, lengths_B, rows

    def rollout(self, examples: list[Example], key: jax.Array) -> tuple[step_lib.Batch, dict]:
        c = self.config
        G = c.rollout.responses_per_prompt
        out, texts, lengths_B, rows = self._sample(
            examples, key, self.rollout_sampling, own_rows=True, chunks=c.rollout.sample_chunks
        )
        # Each process scores its own rows; the rewards then form one global array.
        refs = [ex.answer for ex in examples for _ in range(G)][rows]
        kinds = [ex.kind for ex in examples for _ in range(G)][rows]
        own_rewards, stats = self.scorer.score_batch(
            texts, refs, kinds, format_reward=c.loss.format_reward
        )
        rewards = rows_lib.rows_from_hosts(self.mesh, own_rewards, rows, len(lengths_B))
        rewards_B = rows_lib.to_host(rewards)
        advantages_B = grpo.group_advantages(rewards, G, scale=c.loss.advantage_scale)
        # Trim the padding every row shares: the update then runs on P + the longest response.
        T = out.tokens.shape[1]
        P = T - c.rollout.max_new_tokens
        if c.rollout.length_bucket:
            longest = -(-int(lengths_B.max()) // c.rollout.length_bucket) * c.rollout.length_bucket
            T = min(T, P + longest)
        tokens_BxT, mask_BxT = out.tokens[:, :T], out.attention_mask[:, :T]
        window = slice(P - 1, T)  # the last prompt token and the response slots
        recompute = c.loss.old_logprobs == "rollout" and c.loss.recompute_old_logprobs
        old_BxT, ref_BxT = None, None
        if recompute or self.reference != "none":
            old_BxT, ref_BxT = self._logprobs_fn(
                self.trainable,
                self.frozen,
                self.reference_weights,
                tokens_BxT,
                mask_BxT,
                model_config=self.model_config,
                temperature=float(c.rollout.temperature),
                window=T - P + 1,
                with_old=recompute,
                reference=self.reference,
                group_size=G,
            )
        old_logp = out.logprobs[:, window] if old_BxT is None else old_BxT
        batch = step_lib.Batch(
            tokens=tokens_BxT,
            mask=mask_BxT,
            response_mask=out.response_mask[:, window],
            advantages=advantages_B,
            old_logp=old_logp,
            ref_logp=jnp.zeros_like(old_logp) if ref_BxT is None else ref_BxT,
        )
        metrics = {
            "reward_mean": float(np.mean(rewards_B)),
            "accuracy": float(np.mean(rewards_B >= 1.0)),
            "response_length_mean": float(np.mean(lengths_B)),
            "response_length_max": int(np.max(lengths_B)),
            "reward/timeouts": rows_lib.sum_over_hosts(stats.timeouts),
            "reward/errors": rows_lib.sum_over_hosts(stats.errors),
        }
        return batch, metrics

    # ------------------------------------------------------------------ update

    def _mini_batches(self, batch: step_lib.Batch) -> list[step_lib.Batch]:
        M = self.config.train.mini_batches
        if M == 1:
            return [batch]
        size = batch.tokens.shape[0] // M
        return [jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch) for i in range(M)]

    def train_step(self) -> dict[str, Any]:
        """One rollout batch and its policy updates; returns the step's metrics."""
        t0 = time.perf_counter()
        examples = next(self.train_iter)
        batch, metrics = self.rollout(examples, jax.random.fold_in(self.rollout_key, self.step))
        jax.block_until_ready(batch)
        t1 = time.perf_counter()
        per_update = []
        for mini in self._mini_batches(batch):
            mini = jax.device_put(mini, self.batch_sharding)
            self.trainable, self.opt_state, m = self.update(
                self.trainable, self.opt_state, self.frozen, mini
            )
            per_update.append(m)
        per_update = jax.device_get(per_update)
        t2 = time.perf_counter()

        self.step += 1
        evals = int(sum(m["grad_evals"] for m in per_update))
        self.counters.backward_passes += evals
        self.counters.wall_seconds += t2 - t0
        for key in per_update[0]:
            metrics[key] = float(np.mean([m[key] for m in per_update]))
        metrics.update(
            backward_passes=self.counters.backward_passes,
            wall_seconds=self.counters.wall_seconds,
            rollout_seconds=t1 - t0,
            update_seconds=t2 - t1,
        )
        return metrics

    # ------------------------------------------------------------------ eval

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Avg pass@1 / pass@k / maj@n per benchmark; logged and printed as a table."""
        e = self.config.eval
        results = {}
        for name, examples in self.eval_sets.items():
            Q = min(e.prompts_per_batch, len(examples))
            correct, answers = [], []
            for start in range(0, len(examples), Q):
                chunk = examples[start : start + Q]
                padded = chunk + [chunk[-1]] * (Q - len(chunk))  # one shape, one compile
                _, texts, _, _ = self._sample(
                    padded,
                    jax.random.fold_in(self.eval_key, start),  # same draws every eval
                    self.eval_sampling,
                    own_rows=False,  # every process scores every row: one table for all
                )
                texts = texts[: len(chunk) * e.n_samples]
                refs = [ex.answer for ex in chunk for _ in range(e.n_samples)]
                kinds = [ex.kind for ex in chunk for _ in range(e.n_samples)]
                scores, _ = self.scorer.score_batch(texts, refs, kinds)
                correct.append(np.asarray(scores).reshape(len(chunk), e.n_samples) >= 1.0)
                answers += [
                    [canonical_answer(extract_answer(t)) for t in texts[i : i + e.n_samples]]
                    for i in range(0, len(texts), e.n_samples)
                ]
            summary = summarize(np.concatenate(correct), answers, ks=tuple(e.pass_k))
            results[name] = summary
            self.logger.log_eval(
                self.step,
                name,
                dict(
                    summary,
                    backward_passes=self.counters.backward_passes,
                    wall_seconds=self.counters.wall_seconds,
                ),
            )
        if self.is_main and not self.config.train.quiet:
            print(f"\nEvaluation at step {self.step}:\n{benchmark_table(results)}", flush=True)
        return results

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "trainable": self.trainable,
            "opt_state": self.opt_state,
            "step": self.step,
            "data": self.train_iter.state(),
            "counters": dataclasses.asdict(self.counters),
        }

    def save(self) -> None:
        self.checkpointer.save(
            self.step, self._state(), metadata={"config": json.loads(self.config.to_json())}
        )

    def _maybe_resume(self) -> None:
        latest = self.checkpointer.latest_step()
        if latest is None:
            return
        state = self.checkpointer.restore(latest, target=self._state())
        self.trainable, self.opt_state = state["trainable"], state["opt_state"]
        self.step = int(state["step"])
        self.train_iter.restore(state["data"])
        self.counters = Counters(**{k: v for k, v in state["counters"].items()})
        if self.is_main and not self.config.train.quiet:
            print(f"Resumed from {self.workdir} at step {self.step}.", flush=True)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, dict[str, float]]:
        """Trains to `train.steps`; returns the final evaluation's results."""
        c = self.config
        results = {}
        if c.eval.at_start and self.step == 0 and self.eval_sets:
            results = self.evaluate()
        with ProgressBar(c.train.steps, start_step=self.step, quiet=c.train.quiet) as bar:
            while self.step < c.train.steps:
                metrics = self.train_step()
                self.logger.log_metrics(self.step, metrics)
                bar.update(metrics)
                last = self.step == c.train.steps
                if self.eval_sets and (last or (c.eval.every and self.step % c.eval.every == 0)):
                    results = self.evaluate()
                every = c.train.checkpoint_every
                if last or (every and self.step % every == 0):
                    self.save()
        self.close()
        return results

    def close(self) -> None:
        self.checkpointer.wait()
        self.checkpointer.close()
        self.logger.close()
        self.scorer.close()
