"""What `handlers/cli.py` runs: `serve` and `follow` (`serve.py`), the flags turned into the
engine's settings (`settings.py`), the config file (`config_file.py`) and the model commands
(`model_commands.py`)."""
