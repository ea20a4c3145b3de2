"""tspo_jax: TSPO (Turn-level Stage-aware Policy Optimization) for search agents, in JAX."""

__version__ = "0.1.0"
