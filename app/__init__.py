"""Lowering service: upload a torch.export program, get a verified AOTInductor pt2 archive."""

__version__ = "0.1.0"
