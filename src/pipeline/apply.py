"""``python -m pipeline.apply``: the command line of ``pipeline.sharing.apply``."""

from pipeline.sharing.apply import main

if __name__ == "__main__":
    main()
