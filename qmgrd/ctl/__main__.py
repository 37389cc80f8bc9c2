"""python -m qmgrd.ctl — the same as the ``qmgr-ctl`` console script (see qmgrd.ctl.cli)."""

from qmgrd.ctl.cli import main

main()
