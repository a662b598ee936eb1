"""What every command line of the project shares: one-line errors and boolean flags. It imports nothing of the
project, so a library module that also runs as a command (perplexity.py, hf.py, ...) can use it."""
import argparse
import sys


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got '{value}'")


class BoolFlag(argparse.Action):
    """--flag, --flag=False and --no-flag alike."""

    def __init__(self, option_strings, dest, **kwargs):
        name = option_strings[0][2:]
        super().__init__([f"--{name}", f"--no-{name}"], dest, nargs="?", type=str2bool, metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value")
            value = False
        setattr(namespace, self.dest, True if value is None else value)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (the usage of hundreds of flags is --help's job)."""

    def error(self, message):
        sys.exit(f"{self.prog}: error: {message}")
