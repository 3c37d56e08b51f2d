"""Data pipeline: tokenizers, corpus preparation into token shards, and a resumable token loader."""

from .loader import TokenLoader
from .prepare import DataError, Prepared, prepare, resolve_inputs, iter_documents
from .tokenizer import eos_id, load_tokenizer, train_tokenizer

__all__ = ["DataError", "Prepared", "TokenLoader", "eos_id", "iter_documents", "load_tokenizer", "prepare",
           "resolve_inputs", "train_tokenizer"]
