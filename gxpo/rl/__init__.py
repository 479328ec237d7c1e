"""RL pieces of one training step, each a module with one job; nothing here imports gxpo.train.

- `sampler`: jitted KV-cache sampling from the params being trained (`sample`, `generate`): a
  named loop state over `gxpo.models.decode`, one frozen `SamplingConfig` as its static argument.
- `sampling`: the token-draw rules (greedy, temperature, top-p, the two-level inverse CDF).
- `answers`: pure answer extraction, normalisation and matching (what verifier workers import).
- `rewards`: `RewardFunctions` (the weighted sum of built-in and users' reward functions) and
  `RewardScorer` (answer correctness), over worker pools with hard timeouts.
- `grpo`: group advantages, the GRPO clipped loss, KL estimators and verl's aggregations.
- `data`: datasets (registered, files, hub), prompts and the generated arithmetic task;
  `evaluate`: pass@k, maj@n.

Shapes: the key in `gxpo.models.config`.
"""
