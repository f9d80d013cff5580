"""``python -m pipeline.augment``: the command line of ``pipeline.learning.augment``."""

from pipeline.learning.augment import main

if __name__ == "__main__":
    main()
