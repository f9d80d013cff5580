"""``python -m pipeline.calibrate``: the command line of ``pipeline.sharing.calibrate``."""

from pipeline.sharing.calibrate import main

if __name__ == "__main__":
    main()
