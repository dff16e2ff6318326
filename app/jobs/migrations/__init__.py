"""Alembic migrations of the job database; a package so an installed service ships them."""
