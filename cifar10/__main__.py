import sys

from cifar10.cli import main

sys.exit(main())
