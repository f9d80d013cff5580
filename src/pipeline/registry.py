"""``python -m pipeline.registry``: the command line of ``pipeline.sharing.registry`` (register, fetch)."""

from pipeline.sharing.registry import main

if __name__ == "__main__":
    main()
