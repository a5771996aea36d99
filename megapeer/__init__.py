"""megapeer: PEER + MLA language-model pretraining on Megatron-Core."""

__version__ = "0.1.0"
