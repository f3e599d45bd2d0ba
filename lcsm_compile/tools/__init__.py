"""The tools that drive the library: the `lcsm-compile` command line (cli.py), the demo (demo.py),
loading a user's model for the CLI (loading.py) and the benchmark harness (bench/)."""
