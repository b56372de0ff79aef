"""``python -m qlit`` / the ``qlit`` command: builds the CLI, nothing else."""

from qlit.cli import main

if __name__ == "__main__":
    main()
