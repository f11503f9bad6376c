"""prefdata: raw preference dumps → validated records → curated splits → tokenized Arrow shards."""

from schemas.manifest import package_version

__version__ = package_version()
