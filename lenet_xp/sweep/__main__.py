import sys

from lenet_xp.sweep import main

sys.exit(main())
