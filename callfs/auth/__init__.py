"""API keys to identities, and the owner permission model."""
