"""The namespace: entries, links and erasure layouts behind ``metadata.base.MetadataStore``."""
