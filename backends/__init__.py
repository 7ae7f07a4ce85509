"""Storage backends: one DBInterface implementation per module (filesystem, sql, mongo)."""
