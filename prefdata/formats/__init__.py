"""Raw preference formats, one module per family; `registry` knows them all and detects them."""
