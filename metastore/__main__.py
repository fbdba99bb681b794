"""`python -m metastore` is the `metastore` command."""
from metastore.cmd.main import cli

if __name__ == "__main__":
    cli()
