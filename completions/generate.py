"""Regenerate the shell completion scripts in this folder from the Typer app:

    python completions/generate.py

``tests/test_completions.py`` fails when the committed scripts differ from what this writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"bash": "ast.bash", "zsh": "_ast", "fish": "ast.fish"}


def completion_script(shell: str) -> str:
    """The script Typer generates for ``shell`` (``ast --show-completion SHELL``)."""
    # Typer picks the shell by detecting the parent process unless told not to; we want all three.
    env = dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    code = "import sys; from ast_cli.cli import app; sys.argv[0] = 'ast'; app(prog_name='ast')"
    proc = subprocess.run([sys.executable, "-c", code, "--show-completion", shell], env=env,
                          capture_output=True, text=True, check=True)
    return proc.stdout


def main() -> None:
    for shell, name in SCRIPTS.items():
        (HERE / name).write_text(completion_script(shell))
        print(f"wrote completions/{name}")


if __name__ == "__main__":
    main()
