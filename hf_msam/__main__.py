"""`python -m hf_msam ...`: the `hf-msam` command, e.g. `accelerate launch -m hf_msam run SCRIPT.py ...`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
