"""``python -m pipeline.configcheck``: the command line of ``pipeline.common.configcheck``."""

from pipeline.common.configcheck import main

if __name__ == "__main__":
    main()
