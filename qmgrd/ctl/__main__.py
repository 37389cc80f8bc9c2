"""python -m qmgrd.ctl — the same as the ``qmgr-ctl`` command (see qmgrd.ctl.entry)."""

from qmgrd.ctl.entry import main

main()
