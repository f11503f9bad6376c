"""prefdata: raw preference dumps → validated records → curated splits → tokenized Arrow shards."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prefdata")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
