import sys

from chunksvc.cli import main

sys.exit(main())
