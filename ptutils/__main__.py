"""``python -m ptutils``: the ``ptutils`` command."""

from ptutils.cli import main

if __name__ == "__main__":
    main()
