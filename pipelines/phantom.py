"""``python -m pipelines.phantom``: the phantom generator's command under the name it has always had.

The generator itself is :mod:`pipelines.offline.phantom` (an offline tool that no runtime module imports).
"""

from pipelines.offline.phantom import main

if __name__ == "__main__":
    raise SystemExit(main())
