"""``python -m pipeline.report``: the command line of ``pipeline.results.report``."""

from pipeline.results.report import main

if __name__ == "__main__":
    main()
