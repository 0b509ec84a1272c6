"""Errors meant for the user: the CLI prints them as one line and exits non-zero."""


class UserInputError(ValueError):
    """Bad input from the user (file, option, array): the message says what and how to fix it."""
