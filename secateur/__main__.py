"""`python -m secateur ...`, and `torchrun --nproc-per-node N -m secateur prune|quantize ...`:
the command line, inside torchrun's process group when torchrun started it."""

from __future__ import annotations

# isort: off
from secateur import cli  # first: it guards Ctrl-C during the slow imports
# isort: on
import os
import sys

from secateur import distributed

# The layer-wise steps split their work across ranks; any other command would run whole on
# every rank and write the same outputs N times.
DISTRIBUTED_COMMANDS = ("prune", "quantize")


def refusal(argv: list[str]) -> str | None:
    """Why this command cannot run under torchrun, or None when it can."""
    command = next((a for a in argv if not a.startswith("-")), "")
    if distributed.world() == 1 or command in DISTRIBUTED_COMMANDS:
        return None
    return (f"under torchrun secateur runs {' and '.join(DISTRIBUTED_COMMANDS)}; run "
            f"'{command}' as one process")


def main() -> None:
    distributed.init()
    try:
        reason = refusal(sys.argv[1:])
        if reason is not None:
            if distributed.is_main():
                sys.stderr.write(f"error: {reason}\n")
            sys.exit(2)
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - one rank prints the results
        cli.main()
    finally:
        distributed.finish()


if __name__ == "__main__":
    main()
