"""The path chat completions, responses and messages share: preparing and running a generation
(`generation.py`; its answer's neutral events and tool-call splitting are the engine's,
engine/generation/answer.py), several choices (`choices.py`), image inputs (`images.py`) and
stored responses (`response_store.py`)."""
