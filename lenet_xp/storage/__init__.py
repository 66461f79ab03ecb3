"""Files that survive a crash: checkpoints written atomically (:mod:`.checkpoint`) and
directory fsync (:mod:`.fsync`)."""
