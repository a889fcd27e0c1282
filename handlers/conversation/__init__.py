"""The path chat completions, responses and messages share: preparing and running a generation
(`generation.py`), its neutral answer events (`answer.py`), several choices (`choices.py`), image
inputs (`images.py`) and stored responses (`response_store.py`)."""
