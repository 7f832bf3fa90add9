"""Durable background work (replica copies, later repair and reclaim): the WorkQueue seam."""
