"""``python -m pipelines.offline.phantom``: see :mod:`pipelines.offline.phantom.cli`."""

from pipelines.offline.phantom.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
