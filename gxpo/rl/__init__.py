"""RL pieces: sampling, GRPO loss, rewards, data, evaluation. Imports nothing from gxpo.train."""
