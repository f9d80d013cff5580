"""``python -m pipeline.preprocess``: the command line of ``pipeline.intake.preprocess``."""

from pipeline.intake.preprocess import main

if __name__ == "__main__":
    main()
