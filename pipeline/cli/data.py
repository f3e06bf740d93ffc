"""`convpipe` commands of this group (filled in by its issue)."""


def register(subparsers) -> None:
    """Add this group's commands to the top-level parser (none yet)."""
