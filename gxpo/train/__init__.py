"""Training: config -> objects -> the loop, each module one job.

- `trainer`: the loop, sample -> score -> batch -> update(s) -> log / eval / checkpoint.
- `builders`: config groups -> objects (model, loss config, schedule, inner optimizer, gate,
  policy update, update step); the Trainer and every benchmark build through them.
- `updates`: the policy-update registry (name, factory, inner updates per step, memory
  buffers, config defaults); a new policy update is a combinator plus one `register(...)`.
- `state`: `TrainState`, the one pytree the update step carries and a checkpoint holds.
- `step`: the jitted update step and gradient accumulation over micro-batches.
- `loss`: the GRPO loss of the model on a `Batch`, and the old / reference log-probs.
- `config` / `defaults`: cross-field checks of a config, and the base config.
- `mesh`: the device mesh and every sharding; `rows`: moving rows between hosts and the mesh;
  `memory`: the per-device memory estimate and its advice.
- `checkpoint`, `logging`, `plots`: Orbax checkpoints, JSONL / TensorBoard / progress bar,
  plots of runs.
"""
