"""What only development, demos, benchmarks and tests use: the embedded PostgreSQL (which, run as root,
creates an account and widens permissions), `batchd demo` and its tour of the emulator, a small SSE reader.

Nothing the daemon runs imports this package (tests/test_structure.py checks it); the command line imports
it only when `batchd demo` runs.
"""
