"""The project's one error type for user mistakes (config, input files, paths).

It lives at the bottom of the import graph (data/ imports nothing of ours) so that data/, models/,
trainer/ and tools/ can all raise it. Command-line tools print its message without a traceback and
exit with status 2 (see trainer/core/cli.py).
"""


class UserError(Exception):
    """A mistake the user can fix. The message is one line naming the file, line or key and the fix."""
