"""The ASGI shell around the operations: middlewares (`middleware.py`), connection limits and the
header deadline (`connections.py`) and Connexion's security callbacks (`security.py`)."""
