"""``python -m pipeline.models``: the command line of ``pipeline.learning.models``."""

from pipeline.learning.models import main

if __name__ == "__main__":
    main()
