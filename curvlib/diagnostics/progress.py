"""Progress bars for the long loops of the diagnostics, that can always be turned off.

Every diagnostic that loops over many products (Lanczos iterations, SLQ probes, Hutchinson probe
batches, passes over data) takes ``progress: bool | None``:

* ``True`` shows a ``tqdm`` bar on stderr;
* ``False`` never shows one;
* ``None`` (the default) shows one only when stderr is an interactive terminal, so that logs, CI
  runs and notebooks executed headless stay clean.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_enabled(progress: bool | None) -> bool:
    """Resolve the ``progress`` argument: ``None`` means "only on a terminal"."""
    if progress is None:
        return sys.stderr.isatty()
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True, False or None, got {progress!r}.")
    return progress


def progress_bar(total: int | None, desc: str, progress: bool | None, unit: str = "it") -> tqdm:
    """A ``tqdm`` bar over ``total`` steps (``None``: unknown), disabled unless asked for."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(progress),
                leave=False)
