"""Byte storage backends behind one Protocol (``storage.base.StorageBackend``)."""
