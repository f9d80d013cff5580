"""``python -m pipeline.train``: the command line of ``pipeline.learning.train``."""

from pipeline.learning.train import main

if __name__ == "__main__":
    main()
