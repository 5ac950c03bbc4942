"""Command-line tools: the ahead-of-time GPU compile report, interleaved timing."""
