from ipadapter_jax.cli_errors import run_cli
from ipadapter_jax.evaluate.cli import main

run_cli("python -m ipadapter_jax.evaluate", main)  # one-line errors, exit 2 for a user mistake
