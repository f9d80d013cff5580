"""``python -m pipeline.ingest``: the command line of ``pipeline.intake.ingest``."""

from pipeline.intake.ingest import main

if __name__ == "__main__":
    main()
