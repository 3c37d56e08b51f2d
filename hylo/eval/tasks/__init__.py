"""hylo's offline lm-evaluation-harness tasks: packaged YAML templates and a builder that writes their data
(jsonl) from a held-out corpus. See :mod:`hylo.eval.tasks.build`."""

from .build import TASKS, TaskBuildError, build_tasks, default_corpus, split_sentences

__all__ = ["TASKS", "TaskBuildError", "build_tasks", "default_corpus", "split_sentences"]
