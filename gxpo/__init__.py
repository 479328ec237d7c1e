"""gxpo: gradient-extrapolation policy optimization for RL of language models, in JAX."""

__version__ = "0.1.0"
