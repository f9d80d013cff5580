"""``python -m pipeline.exclusions``: the command line of ``pipeline.intake.exclusions``."""

from pipeline.intake.exclusions import main

if __name__ == "__main__":
    main()
