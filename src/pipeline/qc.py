"""``python -m pipeline.qc``: the command line of ``pipeline.intake.qc``."""

from pipeline.intake.qc import main

if __name__ == "__main__":
    main()
