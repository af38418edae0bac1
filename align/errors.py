"""The one exception type for bad input.

Anything the user can fix (a recipe typo, a missing column, an empty dataset, a
tokenizer without a pad token) raises `AlignError`. The CLI turns it into one line
on stderr and exit status 2, with no traceback; every other exception exits 1.
"""


class AlignError(Exception):
    """Bad input: usage, recipe, model or data. The message says what, where, and what was expected."""
