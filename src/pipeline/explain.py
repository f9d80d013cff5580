"""``python -m pipeline.explain``: the command line of ``pipeline.results.explain``."""

from pipeline.results.explain import main

if __name__ == "__main__":
    main()
