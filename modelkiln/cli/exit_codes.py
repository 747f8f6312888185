"""kiln's exit codes, one per kind of outcome, so a CI script can tell them apart.

As diff and cmp do: 1 means the check ran and said no, 2 means it could not run.
"""

from __future__ import annotations

OK = 0
# A gate said no: `kiln compare` found a regression or an unmeasured entry, `kiln validate`
# a component outside its tolerance, `kiln verify` a file that does not match kiln.json,
# `kiln profiles validate` an invalid profile.
CHECK_FAILED = 1
# The user can fix it: a bad command line (click's own code), bad input (a KilnError: an
# unknown model, a corrupt file, an impossible profile), the disk, permissions or memory.
USER_ERROR = 2
INTERNAL_ERROR = 70  # a modelkiln bug (sysexits' EX_SOFTWARE): please report it
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

DOCUMENTED = {
    OK: "done; every check passed",
    CHECK_FAILED: "a check failed: compare found a regression or an unmeasured entry, "
    "validate a component outside its tolerance, verify a changed file, profiles validate "
    "an invalid profile",
    USER_ERROR: "the command could not run: a bad command line or bad input (the error line "
    "names the problem and the fix), the disk, permissions or memory",
    INTERNAL_ERROR: "a modelkiln bug: please report it with the output of -v",
    INTERRUPTED: "interrupted (Ctrl-C)",
}
