"""Lightning DataModules for continual task sequences, installed as ``mllm_cl.data_modules`` (class paths
read ``mllm_cl.data_modules.X``; the old ``data_modules.X`` still works, with a ``DeprecationWarning``).

``TaskSequence``: the task sequence, the current task's training data and every task's test data.
"""

from mllm_cl.data_modules.continual import TaskSequence

__all__ = ["TaskSequence"]

if __name__ != "mllm_cl.data_modules":  # this folder imported by its old top-level name (a checkout on sys.path)
    from mllm_cl._packages import adopt_old_name

    adopt_old_name(__name__)
