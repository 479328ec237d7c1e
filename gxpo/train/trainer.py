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

from gxpo.models import packing
from gxpo.rl import grpo
from gxpo.rl.answers import canonical_answer, extract_answer
from gxpo.rl.data import (
    ArithTask,
    BatchIterator,
    Example,
    build_prompt,
    encode_prompts,
    load_source,
    parse_source,
)
from gxpo.rl.evaluate import benchmark_table, summarize
from gxpo.rl.rewards import RewardFunctions, RewardScorer, Scores
from gxpo.rl.sampler import (
    SampleOutput,
    SamplingConfig,
    benchmark_budgets,
    end_token_ids,
    sample,
    split_prompts,
)
from gxpo.train import builders, run_state
from gxpo.train import loss as loss_lib
from gxpo.train import memory as memory_lib
from gxpo.train import mesh as mesh_lib
from gxpo.train import rows as rows_lib
from gxpo.train import surrogate as surrogate_lib
from gxpo.train.checkpoint import Checkpointer, prepare_workdir
from gxpo.train.config import validate
from gxpo.train.logging import ProgressBar, RunLogger
from gxpo.train.mirror import WandbMirror
from gxpo.train.state import TrainState, advance
from gxpo.train.step import split_micro_batches


def batch_logprobs_in_chunks(*args: Any, chunks: int, group_size: int = 1, **kwargs: Any):
    """`loss.batch_logprobs` over the rows in `chunks` sequential chunks of whole groups of
    `group_size` rows, each chunk spread over the devices as the update's micro-batches are
    (`split_micro_batches`): the memory of one chunk, the same log-probs."""
    if chunks == 1:
        return loss_lib.batch_logprobs(*args, group_size=group_size, **kwargs)
    return _logprobs_in_chunks(*args, chunks=chunks, group_size=group_size, **kwargs)


@functools.partial(
    jax.jit,
    static_argnames=(
        "chunks", "group_size", "model_config", "temperature", "window", "with_old", "reference"
    ),
)  # fmt: skip
def _logprobs_in_chunks(trainable, frozen, reference_weights, tokens_BxT, mask_BxT, *,
                        chunks, group_size, **kwargs):  # fmt: skip
    def one(rows):
        tokens_CxT, mask_CxT = rows
        return loss_lib.batch_logprobs(
            trainable, frozen, reference_weights, tokens_CxT, mask_CxT,
            group_size=group_size, **kwargs
        )  # fmt: skip

    split = functools.partial(split_micro_batches, count=chunks, group_size=group_size)
    out_YxCxA = jax.lax.map(one, (split(tokens_BxT), split(mask_BxT)))

    def merge(x_YxCxA):  # split_micro_batches' inverse: prompt q was in chunk q % chunks
        Y, C = x_YxCxA.shape[:2]
        x = x_YxCxA.reshape(Y, C // group_size, group_size, *x_YxCxA.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape(Y * C, *x_YxCxA.shape[2:])

    return jax.tree.map(merge, out_YxCxA)


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

    `evaluate_only=True` (through `for_evaluation`) builds a Trainer that only evaluates: it
    neither resumes from nor writes to `workdir` beyond eval.jsonl (no config.json, no
    checkpoints, no TensorBoard).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | Path,
        *,
        checked: bool = False,
        evaluate_only: bool = False,
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
        # Responses packed into rows (the same math, less padding) where one device holds all
        # of a batch's rows: a packing plan indexes across rows.
        self.packed = (
            c.train.pack_responses
            and c.train.micro_batches == 1
            and mesh_lib.row_sharding(self.mesh, (self.update_rows,)).is_fully_replicated
        )
        self.workdir = prepare_workdir(workdir)  # a file, unwritable or full: one line, now
        key = jax.random.key(c.train.seed)
        self.rollout_key, self.eval_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

        # Data first: a missing file fails before a model load.
        source = self._source(c.data.train, c.data.train_split)
        self.train_iter = BatchIterator(source, c.rollout.prompts_per_step, seed=c.train.seed)
        self.eval_sets = {parse_source(e).name: self._eval_examples(e) for e in c.data.eval}
        self.scorer = RewardScorer(timeout_s=c.reward.timeout_s)
        self.rewards = RewardFunctions(
            c.reward.functions, c.reward.weights, scorer=self.scorer, timeout_s=c.reward.timeout_s
        )
        self.scorer.start()  # verifier workers warm up while the model loads and compiles
        self.rewards.start()  # and the user reward functions' workers import theirs

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
        self.surrogate = None  # GXPO's predicted point against real steps (diagnostic only)
        if c.logging.get("surrogate_every", 0):
            self.surrogate = surrogate_lib.SurrogateCheck(c, self.model_config)
        # Rows decoded at once: below a call's rows, the refilling sampler (one call).
        rows = c.rollout.prompts_per_step * c.rollout.responses_per_prompt
        slots = c.rollout.decode_slots
        if not slots and c.rollout.sample_chunks > 1:
            slots = rows // c.rollout.sample_chunks  # the chunks' KV-cache rows, in one call
        if slots:
            rows_lib.check_rows(slots, self.mesh, "config.rollout.decode_slots")
        # One sampling config per kind of call; each call adds its prompts' shared prefix.
        sampling = functools.partial(
            SamplingConfig, eos_ids=self.eos_ids, pad_id=self.pad_id, slots=slots
        )
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
        # The rollout batch's log-probs in the update's micro-batches: its logits at once would
        # be [B, A, V] float32 (hundreds of GB at 128 x 5 rows of 3k tokens).
        chunks = self._logprob_chunks = c.train.mini_batches * c.train.micro_batches
        logprobs = functools.partial(batch_logprobs_in_chunks, chunks=chunks)
        self._logprobs_fn = mesh_lib.on_mesh(self.mesh, logprobs)
        if evaluate_only:  # `for_evaluation` sets the state, then the logger
            self.checkpointer, self.logger = None, None
            return

        self.checkpointer = Checkpointer(self.workdir, max_to_keep=c.train.keep_checkpoints)
        self._maybe_resume()
        if self.is_main:
            (self.workdir / "config.json").write_text(c.to_json(indent=2))
        # A resumed run keeps the rows of the steps and evaluations its checkpoint includes
        # (the evaluation at a step runs before its save); a fresh run, or one killed before its
        # first checkpoint, starts its logs over.
        self.logger = RunLogger(self.workdir, start_step=self.step + 1 if self.step else 0)
        self.wandb = None
        if c.logging.wandb_project and self.is_main:
            self.wandb = WandbMirror(c.logging.wandb_project, self.workdir, c.to_dict())

    @classmethod
    def for_evaluation(
        cls,
        config: ml_collections.ConfigDict,
        out_dir: str | Path,
        *,
        run: str | Path | None = None,
        step: int | None = None,
    ) -> Trainer:
        """A Trainer whose `evaluate()` evaluates a policy and writes only `out_dir`/eval.jsonl.

        The policy is the checkpoint `step` (default: the latest) of the run in the work
        directory `run`, read without writing there (so a running trainer may be evaluated),
        or, with `run=None`, the config's initial model (`model.path`, or the random init).
        Rows of `out_dir`/eval.jsonl from an earlier evaluation of the same step are replaced.
        """
        trainer = cls(config, out_dir, evaluate_only=True)
        if run is not None:
            trainer.state = run_state.restore(run, trainer.state, step)
        trainer.logger = RunLogger(trainer.workdir, start_step=trainer.step, tensorboard=False)
        trainer.wandb = None
        return trainer

    def _build_step(self, trainable: dict) -> None:
        """The initial train state and the jitted update step, both on the mesh."""
        self.state, state_sh = builders.initial_state(
            self.tx, self.model_config, trainable, self.train_iter.state(), self.mesh
        )
        self.scalar_sharding = state_sh.step
        shardings = mesh_lib.weight_shardings(self.model_config, self.mesh)
        frozen_sh = mesh_lib.like(shardings, self.frozen)
        self.batch_sharding = mesh_lib.row_shardings(
            self.mesh, self.update_rows, loss_lib.batch_ranks(self.packed)
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

    def _load(self, entry: str, split: str | None, for_eval: bool) -> list[Example]:
        """A registered dataset, a file or a hub dataset (`gxpo.rl.data.load_source`)."""
        d = self.config.data
        return load_source(
            entry,
            split=split,
            data_dir=d.data_dir or None,
            question_field=d.question_field,
            answer_field=d.answer_field or None,
            kind=d.answer_kind,
            for_eval=for_eval,
        )

    def _source(self, entry: str, split: str) -> list[Example] | ArithTask:
        if entry == "arith":
            return ArithTask(**self.config.data.arith.to_dict())
        return self._load(entry, split or None, for_eval=False)

    def _eval_examples(self, entry: str) -> list[Example]:
        if entry == "arith":
            examples = ArithTask(**self.config.data.arith.to_dict()).eval_examples()
        else:
            examples = self._load(entry, None, for_eval=True)
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
        self,
        examples,
        key,
        sampling: SamplingConfig,
        *,
        own_rows: bool,
        chunks: int = 1,
        rollout: bool = False,
    ) -> Samples:
        """Samples on the mesh: one call of the refilling sampler where `sampling.slots` is
        below the rows, else in `chunks` sequential calls of as many prompts each (one
        compilation, a KV cache for one chunk); the same draws either way (a row's come from
        its index in the whole batch). Decodes the texts of this process's rows (`own_rows`)
        or of all rows. A `rollout` call's responses end at `rollout.benchmark_lengths`."""
        tokens_QxP, mask_QxP = self._encode(examples)  # one prompt length for every chunk
        # A system prompt common to all prompts is prefilled once (valid for every chunk too).
        split = split_prompts(tokens_QxP, mask_QxP, self.config.rollout.prompt_bucket)
        sampling = dataclasses.replace(sampling, prompt_split=split)
        rows = len(examples) * sampling.num_samples
        if 0 < sampling.slots < rows:
            chunks = 1
        spec = self.config.rollout.benchmark_lengths
        budget_B = None
        if rollout and spec:
            budget_B = benchmark_budgets(spec, key, rows, sampling.max_new_tokens)
        weights = self.weights
        outs = [
            self._sample_fn(
                weights,
                self.model_config,
                rows_lib.put_rows(self.mesh, tokens),
                rows_lib.put_rows(self.mesh, np.asarray(mask, bool)),
                key,
                sampling,
                None if budget_B is None else rows_lib.put_rows(self.mesh, budget),
                first_row=chunk * (rows // chunks),
            )
            for chunk, (tokens, mask, budget) in enumerate(
                zip(
                    np.split(tokens_QxP, chunks),
                    np.split(mask_QxP, chunks),
                    np.split(np.zeros(rows) if budget_B is None else budget_B, chunks),
                )
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
            rollout=True,
        )
        rewards, reward_metrics, scores = self.score(examples, samples)
        if self.config.logging.samples_per_step:
            # Every process computes this: the slice is a collective on a multi-host mesh.
            truncated_B = rows_lib.to_host(self._truncated(samples.out))
            if self.is_main:
                rows = self._sample_rows(examples, samples, scores, truncated_B)
                self.logger.log_samples(self.step + 1, rows)
        lengths_B = samples.lengths_B
        metrics = {
            **reward_metrics,
            "response_length_mean": float(np.mean(lengths_B)),
            "response_length_max": int(np.max(lengths_B)),
        }
        if self.config.rollout.filter_groups:
            samples, rewards, filter_metrics = self._varied_groups(samples, rewards, key)
            metrics.update(filter_metrics)
        return self.make_batch(samples, rewards), metrics

    def _varied_groups(
        self, samples: Samples, rewards: jax.Array, key: jax.Array
    ) -> tuple[Samples, jax.Array, dict]:
        """DAPO's dynamic sampling: the step's batch made of groups whose rewards vary, sampling
        up to `rollout.max_resample_rounds` more batches of prompts (the data iterator moves on,
        so a resumed run draws the same) until Q such groups are found; a batch still short is
        topped up with the uniform groups, first round first. Returns the new samples (every
        row on every process), rewards and metrics."""
        c = self.config
        G, Q = c.rollout.responses_per_prompt, c.rollout.prompts_per_step
        rounds = []  # per round: host arrays of every row, and which groups vary

        def collect(s: Samples, r: jax.Array) -> int:
            r_B = rows_lib.to_host(r)
            out = [rows_lib.to_host(a) for a in s.out]  # tokens, masks, logprobs, lengths
            varied_Q = np.ptp(r_B.reshape(-1, G), axis=1) > 0
            rounds.append((out, r_B, varied_Q))
            return int(varied_Q.sum())

        found, extra = collect(samples, rewards), 0
        while found < Q and extra < c.rollout.max_resample_rounds:
            extra += 1
            examples = next(self.train_iter)
            more = self._sample(
                examples,
                jax.random.fold_in(key, 1_000_000 + extra),  # apart from the step's own draws
                self.rollout_sampling,
                own_rows=True,
                chunks=c.rollout.sample_chunks,
                rollout=True,
            )
            found += collect(more, self.score(examples, more)[0])
        # Kept groups in order, then uniform ones; prompts left-padded to the longest round's.
        picks = [(i, q) for want in (True, False) for i, (_, _, v) in enumerate(rounds)
                 for q in np.flatnonzero(v == want)][:Q]  # fmt: skip
        width = max(out[0].shape[1] for out, _, _ in rounds)

        def rows(i: int, q: int, field: int) -> np.ndarray:
            x = rounds[i][0][field][q * G : (q + 1) * G]
            if x.ndim == 2 and x.shape[1] < width:
                fill = self.pad_id if field == 0 else 0
                x = np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=fill)
            return x

        host = SampleOutput(*(
            np.concatenate([rows(i, q, f) for i, q in picks])
            for f in range(len(SampleOutput._fields))
        ))  # fmt: skip
        out = SampleOutput(*(rows_lib.put_rows(self.mesh, x) for x in host))
        rewards_B = np.concatenate([rounds[i][1][q * G : (q + 1) * G] for i, q in picks])
        return (
            Samples(out, [], host.lengths, slice(None)),
            rows_lib.put_rows(self.mesh, rewards_B),
            {
                "filtered_fraction": float(1 - rounds[0][2].mean()),
                "resample_rounds": extra,
                "varied_groups": min(found, Q) / Q,
            },
        )

    def score(self, examples: list[Example], samples: Samples) -> tuple[jax.Array, dict, Scores]:
        """Every row's reward as one global array (each process scores its own rows), their
        metrics (`reward_mean`, `accuracy` when the data has answers, `reward/<name>` per reward
        function and its error and timeout counts), and this process's rows' `Scores`."""
        G, B = self.config.rollout.responses_per_prompt, len(samples.lengths_B)
        own = [ex for ex in examples for _ in range(G)][samples.rows]
        scores = self.rewards(
            [ex.question for ex in own],
            samples.texts,
            [ex.answer for ex in own],
            [ex.kind for ex in own],
            [ex.extra for ex in own],
            groups=np.arange(B)[samples.rows] // G,  # one call per prompt's responses
        )
        rw = self.config.reward
        if rw.overlong_buffer:  # DAPO's soft overlong penalty, a part of the reward
            penalty = np.asarray(
                grpo.overlong_penalty(
                    samples.lengths_B[samples.rows],
                    self.config.rollout.max_new_tokens,
                    rw.overlong_buffer,
                    rw.overlong_penalty,
                ),
                np.float32,
            )
            scores.rewards = scores.rewards + penalty
            scores.parts = {**scores.parts, "overlong": penalty}
        rewards = rows_lib.rows_from_hosts(self.mesh, scores.rewards, samples.rows, B)
        # Every row's parts (and verdict), to average over all processes' rows at once.
        columns = [scores.rewards, *scores.parts.values()]
        if scores.correct is not None:
            columns.append(scores.correct.astype(np.float32))
        table = np.stack(columns, axis=1)
        means = rows_lib.to_host(rows_lib.rows_from_hosts(self.mesh, table, samples.rows, B))
        means = means.mean(axis=0)
        metrics = {"reward_mean": float(means[0])}
        if scores.correct is not None:
            metrics["accuracy"] = float(means[-1])
        for name, mean in zip(scores.parts, means[1:]):
            metrics[f"reward/{name}"] = float(mean)
        for key, count in scores.counts.items():
            metrics[key] = rows_lib.sum_over_hosts(count)
        return rewards, metrics, scores

    def _sample_rows(
        self, examples: list[Example], samples: Samples, scores: Scores, truncated_B: np.ndarray
    ) -> list[dict[str, Any]]:
        """`logging.samples_per_step` of this process's rows for samples.jsonl, spread over
        the step's prompts."""
        G, n = self.config.rollout.responses_per_prompt, len(samples.texts)
        picks = np.unique(np.linspace(0, n - 1, self.config.logging.samples_per_step).round())
        own = [ex for ex in examples for _ in range(G)][samples.rows]
        lengths, truncated = samples.lengths_B[samples.rows], truncated_B[samples.rows]
        rows = []
        for i in picks.astype(int):
            row = {
                "prompt": own[i].question,
                "completion": samples.texts[i],
                "answer": own[i].answer,
                "reward": float(scores.rewards[i]),
            }
            row.update((f"reward/{name}", float(part[i])) for name, part in scores.parts.items())
            row.update(length=int(lengths[i]), truncated=bool(truncated[i]))
            rows.append(row)
        return rows

    def _truncated(self, out: SampleOutput) -> jax.Array:
        """[B] bool: rows cut at `rollout.max_new_tokens`, their last slot holding a token that
        does not end them."""
        ended_B = jnp.isin(out.tokens[:, -1], jnp.asarray(self.eos_ids))
        return (out.lengths == self.config.rollout.max_new_tokens) & ~ended_B

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
            pack = None
            if self.packed and self._logprob_chunks == 1:  # a plan of the whole batch's rows
                pack = tuple(map(jnp.asarray, packing.plan(np.asarray(mask_BxT), T - P + 1)))
            old_BxA, ref_BxA = self._logprobs_fn(
                self.state.trainable,
                self.frozen,
                self.reference_weights,
                tokens_BxT,
                mask_BxT,
                pack=pack,
                model_config=self.model_config,
                temperature=float(c.rollout.temperature),
                window=T - P + 1,
                with_old=recompute,
                reference=self.reference,
                group_size=G,
            )
        old_logp = out.logprobs[:, window] if old_BxA is None else old_BxA
        response_mask_BxA = out.response_mask[:, window]
        if c.loss.mask_truncated:
            response_mask_BxA = response_mask_BxA & ~self._truncated(out)[:, None]
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

    def _placed(self, mini: loss_lib.Batch) -> loss_lib.Batch:
        """A mini-batch as the update takes it: with its packing plan (`train.pack_responses`),
        on the mesh."""
        if self.packed:
            mini = loss_lib.with_packing(mini)
        return jax.device_put(mini, self.batch_sharding)

    def train_step(self) -> dict[str, Any]:
        """One rollout batch and its policy updates; returns the step's metrics."""
        t0, step = time.perf_counter(), self.step
        examples = next(self.train_iter)
        batch, metrics = self.rollout(examples, jax.random.fold_in(self.rollout_key, step))
        jax.block_until_ready(batch)
        t1 = time.perf_counter()
        state, per_update = self.state, []
        surrogate = {}  # run before the update (which donates the state), then not timed
        if self.surrogate is not None and self.surrogate.due(step + 1, state.opt_state):
            first = self._placed(self._mini_batches(batch, step, 0)[0])
            surrogate = self.surrogate(state, self.frozen, first)
        skipped = surrogate.get("surrogate/seconds", 0.0)
        update = self._update_program(state)  # the last step's updates are done: no wait
        for epoch in range(self.config.train.epochs):
            for mini in self._mini_batches(batch, step, epoch):
                state, m = update(state, self.frozen, self._placed(mini))
                per_update.append(m)
        per_update = jax.device_get(per_update)
        t2 = time.perf_counter()
        self.state = advance(
            state,
            step=int(state.step) + 1,
            data=self.train_iter.state(),
            seconds=t2 - t0 - skipped,
            scalar_sharding=self.scalar_sharding,
        )
        for key in per_update[0]:
            metrics[key] = float(np.mean([m[key] for m in per_update]))
        metrics.update(
            backward_passes=int(self.state.backward_passes),
            wall_seconds=float(self.state.wall_seconds),
            rollout_seconds=t1 - t0,
            update_seconds=t2 - t1 - skipped,
        )
        metrics.update(surrogate)
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
            row = self.logger.log_eval(
                self.step,
                name,
                dict(
                    summary,
                    backward_passes=int(self.state.backward_passes),
                    wall_seconds=float(self.state.wall_seconds),
                ),
            )
            if self.wandb:
                self.wandb.log(row, prefix=f"eval/{name}/")
        if self.is_main and not self.config.train.quiet:
            print(f"\nEvaluation at step {self.step}:\n{benchmark_table(results)}", flush=True)
        return results

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        self.checkpointer.save(
            self.step, self.state, metadata={"config": json.loads(self.config.to_json())}
        )

    def _maybe_resume(self) -> None:
        # The newest checkpoint that verifies; corrupt newer ones are moved aside with a warning.
        found = self.checkpointer.restore_newest_intact(target=self.state)
        if found is None:
            return
        self.state = TrainState(*found[1])
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
                row = self.logger.log_metrics(self.step, metrics)
                if self.wandb:
                    self.wandb.log(row)
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
        if self.checkpointer is not None:  # None when evaluate_only
            self.checkpointer.wait()
            self.checkpointer.close()
        self.logger.close()
        if self.wandb:
            self.wandb.close()
        self.rewards.close()
        self.scorer.close()
