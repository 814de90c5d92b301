"""DynaIP data curation: source readers, stages, shard writing, executors (local and Ray)."""
