"""Ray Job entrypoints (`python -m jobs.<name>`): thin wrappers over the `cxr` commands."""
