"""``python -m pipeline.zoo``: the command line of ``pipeline.sharing.zoo``."""

from pipeline.sharing.zoo import main

if __name__ == "__main__":
    main()
