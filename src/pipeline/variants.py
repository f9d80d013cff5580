"""``python -m pipeline.variants``: the command line of ``pipeline.learning.variants``."""

from pipeline.learning.variants import main

if __name__ == "__main__":
    main()
