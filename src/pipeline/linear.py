"""``python -m pipeline.linear``: the command line of ``pipeline.results.linear``."""

from pipeline.results.linear import main

if __name__ == "__main__":
    main()
