"""HTTP layer of the KVzip context service (FastAPI). Never imports torch.

Entry points: `app.main.create_app` (a uvicorn factory) and `python -m app`.
"""

__version__ = "0.1.0"
