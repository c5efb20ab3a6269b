"""``python -m gnc`` is the ``gnc`` command (and ``torchrun ... -m gnc train``)."""

from gnc.cli import main

if __name__ == "__main__":
    main()
