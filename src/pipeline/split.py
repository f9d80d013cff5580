"""``python -m pipeline.split``: the command line of ``pipeline.intake.split``."""

from pipeline.intake.split import main

if __name__ == "__main__":
    main()
