"""``python -m pipeline.grid``: the command line of ``pipeline.intake.grid``."""

from pipeline.intake.grid import main

if __name__ == "__main__":
    main()
