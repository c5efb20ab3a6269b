"""``python -m gnc`` is the ``gnc`` command (and ``torchrun ... -m gnc train``)."""

import sys

try:  # Ctrl-C in the (light) import of the command line: no traceback either
    from gnc.cli import main
except KeyboardInterrupt:
    print("gnc: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    main()
