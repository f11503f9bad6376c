"""Contracts shared by `prefdata` (data side) and `train` (model side): records, shards, manifests."""
