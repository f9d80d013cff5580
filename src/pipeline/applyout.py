"""``python -m pipeline.applyout``: the command line of ``pipeline.sharing.applyout``."""

from pipeline.sharing.applyout import main

if __name__ == "__main__":
    main()
