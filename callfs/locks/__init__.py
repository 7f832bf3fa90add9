"""Path locks behind ``locks.base.LockManager``."""
