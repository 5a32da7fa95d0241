"""seqforget: continual unlearning for vision-language models with reversible per-request adapters."""

__version__ = "0.1.0"
