"""HTTP layer: FastAPI routers under ``/v1``; handlers stay thin over ``app.services``."""
