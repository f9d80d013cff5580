"""``python -m pipeline.bidsout``: the command line of ``pipeline.results.bidsout``."""

from pipeline.results.bidsout import main

if __name__ == "__main__":
    main()
