"""``python -m curvlib``: the same as the ``curvlib`` command."""

from curvlib.cli import main

if __name__ == "__main__":
    main()
