"""batchd: send every Claude request that can wait through the Message Batches API."""

__version__ = "0.1.0"
