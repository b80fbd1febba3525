"""The `moekit` command: one file per verb, each thin over the library."""
