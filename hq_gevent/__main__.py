import sys

from hq_gevent.cli import main

sys.exit(main())
