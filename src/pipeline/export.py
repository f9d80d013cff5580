"""``python -m pipeline.export``: the command line of ``pipeline.sharing.export``."""

from pipeline.sharing.export import main

if __name__ == "__main__":
    main()
