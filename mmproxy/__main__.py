"""``python -m mmproxy``: the same entry point as the ``mmproxy`` console script."""

from mmproxy.cli import main

if __name__ == "__main__":
    main()
