"""``python -m pipeline.predict``: the command line of ``pipeline.sharing.predict``."""

from pipeline.sharing.predict import main

if __name__ == "__main__":
    main()
