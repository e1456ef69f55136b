"""dirsync: mirror a master directory to replicas over content-defined-chunk manifests."""

__version__ = "0.1.0"
