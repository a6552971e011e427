"""The command line and what it runs (the demo, the in-package benchmark). Nothing in the
library imports it."""
