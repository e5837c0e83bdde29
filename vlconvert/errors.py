"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix (wrong path, corrupt file, mismatched config, existing output...).

    The message is one line that names the file and, where there is one, the fix.
    """
