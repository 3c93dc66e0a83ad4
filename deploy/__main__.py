"""`python -m deploy ...` is the `knnssd` command, for a source tree without the console script (the GPU
check runs this way with a machine's own python, where the project is not installed)."""

from deploy.cli import main

main()
