"""``python cli.py fit|predict|pipeline ...`` from a checkout: the package's command line, :mod:`mmqdiff.cli`."""
from mmqdiff.cli import main, run  # noqa: F401  (main: LightningCLI in-process, as the tests call it)

if __name__ == "__main__":
    run()
