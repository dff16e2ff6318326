"""Client side of the lowering service: the ``LoweringClient`` SDK and the ``lowerctl`` CLI.

Imports only httpx, rich, pydantic (for the form's model, ``app.schemas.LoweringCreate``)
and the standard library, so it installs and runs on machines without torch.
"""

from app.client.exceptions import ChecksumMismatch, LoweringAPIError, LoweringClientError
from app.client.sdk import LoweringClient

__all__ = ["ChecksumMismatch", "LoweringAPIError", "LoweringClient", "LoweringClientError"]
