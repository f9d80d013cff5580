"""``python -m pipeline.publish``: the command line of ``pipeline.intake.publish``."""

from pipeline.intake.publish import main

if __name__ == "__main__":
    main()
