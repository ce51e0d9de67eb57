"""Independent reference implementations ("oracles") of each method's forward pass.

Each module here is plain torch, imports nothing from the harness, and is written
from reading the authors' published code (or, where none exists, the paper's
equations); its docstring names the repository, commit and file it follows.
``tests/test_oracles.py`` holds our layers against them; ``docs/fidelity.md``
lists what matches and every difference found.
"""
