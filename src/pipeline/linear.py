"""``python -m pipeline.linear``: the command line of ``pipeline.learning.linear``."""

from pipeline.learning.linear import main

if __name__ == "__main__":
    main()
