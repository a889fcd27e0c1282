"""The wire protocols: request bodies parsed into engine values (`protocol.py` for chat and
completions, `responses_protocol.py`, `messages_protocol.py`), error bodies (`errors.py`) and
server-sent events (`sse.py`)."""
