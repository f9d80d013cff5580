"""``python -m pipeline.bidsvalidation``: the command line of ``pipeline.intake.bidsvalidation``."""

from pipeline.intake.bidsvalidation import main

if __name__ == "__main__":
    main()
