"""The `pipefold` command line. One module per command; each only calls library functions."""
