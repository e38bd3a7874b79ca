"""Framework tests: each file runs only in the venv that holds its framework (``scripts/framework_venv.sh NAME``).

The main ``pytest`` run does not collect them: a file whose framework does not import is ignored, and neither
framework is installed in ``.venv``. Run them with ``.venv-NAME/bin/python -m pytest tests/frameworks/test_NAME.py``.
"""

import importlib.util

collect_ignore = [f"test_{name}.py" for name in ("openrlhf", "verl") if importlib.util.find_spec(name) is None]
