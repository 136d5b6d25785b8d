"""Worker processes that cannot hang their parent: the checks the phantom renderer and the prepare step share.

Both start their workers with "spawn" (a forked child of a process that has used torch's OpenMP pool can hang)
in a :class:`concurrent.futures.ProcessPoolExecutor` (a :class:`multiprocessing.pool.Pool` replaces a dead worker
and waits forever for its lost results; the executor raises ``BrokenProcessPool``). A spawned worker runs the
caller's main script again before it starts, which a script without an ``if __name__ == "__main__":`` guard turns
into endless nested pools, and cannot run at all when that script was read from stdin (``python -``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

__all__ = ["in_spawned_main", "spawn_can_run_main"]


def in_spawned_main() -> bool:
    """Whether this process is a new spawned worker still re-running the caller's main script, where a nested pool
    could only start more such workers. ``_inheriting`` is the flag multiprocessing itself checks for this."""
    bootstrapping = getattr(mp.current_process(), "_inheriting", False)
    return bool(bootstrapping) and getattr(sys.modules.get("__main__"), "__name__", "") == "__mp_main__"


def spawn_can_run_main() -> bool:
    """Whether spawned workers can import the main module: not when it is a script read from stdin (``python -``),
    whose "file" ``<stdin>`` they cannot open. A notebook's main module has no file and needs no import."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):  # python -m: imported by name
        return True
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)
