"""CallFS: one daemon that serves local disks and S3 buckets as one file namespace over HTTP."""

__version__ = "0.1.0"
