"""dlax: long-context language models (DLA, CoMeT) in JAX/Flax NNX."""

__version__ = "0.1.0"
