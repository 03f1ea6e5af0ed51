"""The `zreg` command line."""
