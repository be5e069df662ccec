"""Lightning callbacks with continual hooks, installed as ``mllm_cl.callbacks`` (class paths read
``mllm_cl.callbacks.X``; the old ``callbacks.X`` still works, with a ``DeprecationWarning``).

``ContinualCallback`` adds ``on_task_start`` / ``on_phase_start`` / ``on_phase_end``
/ ``on_task_end`` to Lightning's hooks; the continual loop calls them.
"""

from mllm_cl.callbacks.base import ContinualCallback

__all__ = ["ContinualCallback"]

if __name__ != "mllm_cl.callbacks":  # this folder imported by its old top-level name (a checkout on sys.path)
    from mllm_cl._packages import adopt_old_name

    adopt_old_name(__name__)
