"""The training loop: sample -> score -> batch -> update(s) -> log / eval / checkpoint.

Shapes: the key in `gxpo.models.config`; here Q prompts per step, G responses per prompt,
B = Q * G, P prompt tokens (bucketed), A max new tokens, T = P + A.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gxpo.rl import grpo
from gxpo.rl.answers import canonical_answer, extract_answer
from gxpo.rl.data import ArithTask, BatchIterator, Example, build_prompt, encode_prompts
from gxpo.rl.data import load_examples as load_dataset
from gxpo.rl.evaluate import benchmark_table, summarize
from gxpo.rl.rewards import RewardScorer
from gxpo.rl.sampler import SampleOutput, SamplingConfig, end_token_ids, sample, split_prompts
from gxpo.train import builders
from gxpo.train import loss as loss_lib
from gxpo.train import memory as memory_lib
from gxpo.train import mesh as mesh_lib
from gxpo.train import rows as rows_lib
from gxpo.train.checkpoint import Checkpointer
from gxpo.train.config import validate
from gxpo.train.logging import ProgressBar, RunLogger
from gxpo.train.state import TrainState, advance, init_state, state_shardings


class Samples(NamedTuple):
    """What `Trainer._sample` drew: the sampler's output (every row), the decoded texts of the
    rows `rows` (this process's, or all), and every row's response length."""

    out: SampleOutput
    texts: list[str]
    lengths_B: np.ndarray
    rows: slice


class Trainer:
    """Builds everything a run needs from a config; `run()` trains.

    The config is checked first (`validate`, then the policy update's own argument checks as
    it is built), before any data or model loads; `checked=True` skips `validate` for a caller
    that ran `builders.check` on it already (`gxpo.experiments.compare` checks every method's
    config before the first one trains).
    """

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str | Path, *, checked: bool = False
    ):
        if not checked:
            validate(config)
        mesh_lib.initialize_distributed(config.mesh)  # before any other JAX call
        self.tx = builders.policy_update(config)  # its combinator checks its arguments
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
        source = self._source(c.data.train, c.data.train_split)
        self.train_iter = BatchIterator(source, c.rollout.prompts_per_step, seed=c.train.seed)
        self.eval_sets = {name: self._eval_examples(name) for name in c.data.eval}
        self.scorer = RewardScorer()
        self.scorer.start()  # verifier workers warm up while the model loads and compiles

        self.model_config, trainable, self.frozen, self.tokenizer = builders.model(
            c.model, c.train.seed, self.mesh
        )
        memory_lib.check_memory(
            c,
            self.model_config,
            self.mesh,
            step_buffers=builders.step_buffers(c),
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
                self.reference_weights = jax.tree.map(jnp.copy, trainable)
        self._build_step(trainable)
        # One sampling config per kind of call; each call adds its prompts' shared prefix.
        sampling = functools.partial(SamplingConfig, eos_ids=self.eos_ids, pad_id=self.pad_id)
        self.rollout_sampling = sampling(
            max_new_tokens=c.rollout.max_new_tokens,
            num_samples=c.rollout.responses_per_prompt,
            temperature=c.rollout.temperature,
        )
        self.eval_sampling = sampling(
            max_new_tokens=c.eval.max_new_tokens,
            num_samples=c.eval.n_samples,
            temperature=c.eval.temperature,
            top_p=c.eval.top_p,
        )
        self._sample_fn = mesh_lib.on_mesh(self.mesh, sample)
        self._logprobs_fn = mesh_lib.on_mesh(self.mesh, loss_lib.batch_logprobs)

        self.checkpointer = Checkpointer(self.workdir, max_to_keep=c.train.keep_checkpoints)
        self._maybe_resume()
        if self.is_main:
            (self.workdir / "config.json").write_text(c.to_json(indent=2))
        self.logger = RunLogger(self.workdir, start_step=self.step + 1)

    def _build_step(self, trainable: dict) -> None:
        """The initial train state and the jitted update step, both on the mesh."""
        shardings = mesh_lib.weight_shardings(self.model_config, self.mesh)
        trainable_sh = mesh_lib.like(shardings, trainable)
        frozen_sh = mesh_lib.like(shardings, self.frozen)
        opt_sh = mesh_lib.opt_state_shardings(self.tx, trainable, trainable_sh, self.mesh)
        self.scalar_sharding = mesh_lib.replicated(self.mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(trainable)
        self.state = init_state(trainable, opt_state, self.train_iter.state(), self.scalar_sharding)
        state_sh = state_shardings(self.state, trainable_sh, opt_sh, self.scalar_sharding)
        self.batch_sharding = mesh_lib.row_shardings(
            self.mesh, self.update_rows, loss_lib.BATCH_RANKS
        )
        shardings = dict(
            in_shardings=(state_sh, frozen_sh, self.batch_sharding),
            out_shardings=(state_sh, self.scalar_sharding),
        )
        update = builders.update_step(self.config, self.model_config, self.tx, **shardings)
        self.update = mesh_lib.on_mesh(self.mesh, update)
        # Once the gate has shut extrapolation off for good, the plain inner step's own program
        # (compiled on first use): the policy update's carries the probe branch of its cond.
        self.plain = builders.plain_step(self.config, self.tx)
        if self.plain is not None:
            plain = builders.update_step(self.config, self.model_config, self.plain.tx, **shardings)
            self.update_plain = mesh_lib.on_mesh(self.mesh, plain)

    def _update_program(self, state: TrainState) -> Any:
        """The plain step's program if `state` is past shutoff for good (it stays so: a resumed
        run picks it from its restored state), else the policy update's."""
        if self.plain is not None and self.plain.is_off(state.opt_state):
            return self.update_plain
        return self.update

    @property
    def step(self) -> int:
        """Training steps done."""
        return int(self.state.step)

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
        return loss_lib.merge_weights(self.state.trainable, self.frozen)

    def _sample(
        self, examples, key, sampling: SamplingConfig, *, own_rows: bool, chunks: int = 1
    ) -> Samples:
        """Samples on the mesh, in `chunks` sequential calls of as many prompts each (one
        compilation, a KV cache for one chunk); decodes the texts of this process's rows
        (`own_rows`) or of all rows."""
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
            response_BxA, rows = rows_lib.host_rows(self.mesh, out.tokens[:, P:])
        else:
            response_BxA, rows = rows_lib.to_host(out.tokens[:, P:]), slice(None)
        lengths_B = rows_lib.to_host(out.lengths)
        texts = self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(response_BxA, lengths_B[rows])], skip_special_tokens=True
        )
        return Samples(out, texts, lengths_B, rows)

    def rollout(self, examples: list[Example], key: jax.Array) -> tuple[loss_lib.Batch, dict]:
        """One step's update batch and its metrics: sample -> score -> batch."""
        samples = self._sample(
            examples,
            key,
            self.rollout_sampling,
            own_rows=True,
            chunks=self.config.rollout.sample_chunks,
        )
        rewards, reward_metrics = self.score(examples, samples)
        lengths_B = samples.lengths_B
        return self.make_batch(samples, rewards), {
            **reward_metrics,
            "response_length_mean": float(np.mean(lengths_B)),
            "response_length_max": int(np.max(lengths_B)),
        }

    def score(self, examples: list[Example], samples: Samples) -> tuple[jax.Array, dict]:
        """Every row's reward as one global array (each process scores its own rows), and
        their metrics."""
        G, c = self.config.rollout.responses_per_prompt, self.config
        refs = [ex.answer for ex in examples for _ in range(G)][samples.rows]
        kinds = [ex.kind for ex in examples for _ in range(G)][samples.rows]
        own_rewards, stats = self.scorer.score_batch(
            samples.texts, refs, kinds, format_reward=c.loss.format_reward
        )
        rewards = rows_lib.rows_from_hosts(
            self.mesh, own_rewards, samples.rows, len(samples.lengths_B)
        )
        rewards_B = rows_lib.to_host(rewards)
        return rewards, {
            "reward_mean": float(np.mean(rewards_B)),
            "accuracy": float(np.mean(rewards_B >= 1.0)),
            "reward/timeouts": rows_lib.sum_over_hosts(stats.timeouts),
            "reward/errors": rows_lib.sum_over_hosts(stats.errors),
        }

    def make_batch(self, samples: Samples, rewards_B: jax.Array) -> loss_lib.Batch:
        """The update's batch: group advantages of the rewards, the rows trimmed to the longest
        response, and the old / reference log-probs of the response window."""
        c, out = self.config, samples.out
        G = c.rollout.responses_per_prompt
        advantages_B = grpo.group_advantages(
            rewards_B, G, scale=c.loss.advantage_scale, std=c.loss.advantage_std
        )
        # Trim the padding every row shares: the update then runs on P + the longest response.
        T = out.tokens.shape[1]
        P = T - c.rollout.max_new_tokens
        if c.rollout.length_bucket:
            bucket = c.rollout.length_bucket
            longest = -(-int(samples.lengths_B.max()) // bucket) * bucket
            T = min(T, P + longest)
        tokens_BxT, mask_BxT = out.tokens[:, :T], out.attention_mask[:, :T]
        window = slice(P - 1, T)  # the last prompt token and the response slots
        recompute = c.loss.old_logprobs == "rollout" and c.loss.recompute_old_logprobs
        old_BxA, ref_BxA = None, None
        if recompute or self.reference != "none":
            old_BxA, ref_BxA = self._logprobs_fn(
                self.state.trainable,
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
        old_logp = out.logprobs[:, window] if old_BxA is None else old_BxA
        response_mask_BxA = out.response_mask[:, window]
        if c.loss.mask_truncated:  # cut at max_new_tokens before an end token
            ended_B = jnp.isin(out.tokens[:, -1], jnp.asarray(self.eos_ids))
            truncated_B = (out.lengths == c.rollout.max_new_tokens) & ~ended_B
            response_mask_BxA = response_mask_BxA & ~truncated_B[:, None]
        return loss_lib.Batch(
            tokens=tokens_BxT,
            mask=mask_BxT,
            response_mask=response_mask_BxA,
            advantages=advantages_B,
            old_logp=old_logp,
            ref_logp=jnp.zeros_like(old_logp) if ref_BxA is None else ref_BxA,
        )

    # ------------------------------------------------------------------ update

    def _mini_batches(self, batch: loss_lib.Batch, step: int, epoch: int) -> list[loss_lib.Batch]:
        """The epoch's mini-batches: the first epoch in rollout order, each later one in an
        order of whole prompt groups that depends on (seed, step, epoch) only, so a resumed
        run draws the same."""
        c = self.config
        M, G = c.train.mini_batches, c.rollout.responses_per_prompt
        if epoch:
            Q = batch.tokens.shape[0] // G
            order_Q = np.random.default_rng([c.train.seed, step, epoch]).permutation(Q)
            rows_B = (order_Q[:, None] * G + np.arange(G)).reshape(-1)
            batch = jax.tree.map(lambda x: x[rows_B], batch)
        if M == 1:
            return [batch]
        size = batch.tokens.shape[0] // M
        return [jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch) for i in range(M)]

    def train_step(self) -> dict[str, Any]:
        """One rollout batch and its policy updates; returns the step's metrics."""
        t0, step = time.perf_counter(), self.step
        examples = next(self.train_iter)
        batch, metrics = self.rollout(examples, jax.random.fold_in(self.rollout_key, step))
        jax.block_until_ready(batch)
        t1 = time.perf_counter()
        state, per_update = self.state, []
        update = self._update_program(state)  # the last step's updates are done: no wait
        for epoch in range(self.config.train.epochs):
            for mini in self._mini_batches(batch, step, epoch):
                mini = jax.device_put(mini, self.batch_sharding)
                state, m = update(state, self.frozen, mini)
                per_update.append(m)
        per_update = jax.device_get(per_update)
        t2 = time.perf_counter()
        self.state = advance(
            state,
            step=int(state.step) + 1,
            data=self.train_iter.state(),
            seconds=t2 - t0,
            scalar_sharding=self.scalar_sharding,
        )
        for key in per_update[0]:
            metrics[key] = float(np.mean([m[key] for m in per_update]))
        metrics.update(
            backward_passes=int(self.state.backward_passes),
            wall_seconds=float(self.state.wall_seconds),
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
                texts = self._sample(
                    padded,
                    jax.random.fold_in(self.eval_key, start),  # same draws every eval
                    self.eval_sampling,
                    own_rows=False,  # every process scores every row: one table for all
                ).texts[: len(chunk) * e.n_samples]
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
                    backward_passes=int(self.state.backward_passes),
                    wall_seconds=float(self.state.wall_seconds),
                ),
            )
        if self.is_main and not self.config.train.quiet:
            print(f"\nEvaluation at step {self.step}:\n{benchmark_table(results)}", flush=True)
        return results

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        self.checkpointer.save(
            self.step, self.state, metadata={"config": json.loads(self.config.to_json())}
        )

    def _maybe_resume(self) -> None:
        latest = self.checkpointer.latest_step()
        if latest is None:
            return
        self.state = TrainState(*self.checkpointer.restore(latest, target=self.state))
        self.train_iter.restore(self.state.data)
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
