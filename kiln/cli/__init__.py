"""Command-line interface: thin click commands over the Python API.

Imported first by the ``kiln`` console script: until its command begins (importing click and
the command's module, parsing), a Ctrl-C ends the process with one line and exit 130, as it
does later; Python's own handler printed a traceback of the import it stopped (a trial's
Ctrl-C 0.07 s after starting ``kiln run``). Nothing has been written by then.
"""

import os
import signal
import sys
import threading


def _interrupted_at_start(signum, frame) -> None:
    os.write(2, b"interrupted (Ctrl-C)\n")
    os._exit(130)


# not where SIGINT is ignored (a background job of a script): Python leaves that as it is too
if os.path.basename(sys.argv[0]) == "kiln" \
        and threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_at_start)  # KilnGroup.invoke puts Python's back
