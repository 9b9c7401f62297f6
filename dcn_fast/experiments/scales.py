"""PLACEHOLDER: being written (issue 11); replaced before merge."""

HELP = "(being written)"


def add_arguments(parser) -> None:
    pass


def run(exp, args) -> dict:
    raise NotImplementedError("scales is being written")
