import sys

from pyengine.commbench.cli import main

sys.exit(main())
