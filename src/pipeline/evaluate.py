"""``python -m pipeline.evaluate``: the command line of ``pipeline.results.evaluate``."""

from pipeline.results.evaluate import main

if __name__ == "__main__":
    main()
