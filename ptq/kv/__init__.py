"""KV-cache compression: CSKV channel shrinking with a bi-branch cache (`ptq.kv.cskv`, `ptq.kv.cskv_cache`)."""
