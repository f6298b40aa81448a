"""``python cli.py fit|predict --config configs/...yaml`` from a checkout: the package's command line, :mod:`mmqdiff.cli`."""
from mmqdiff.cli import main

if __name__ == "__main__":
    main()
